// The live feed: one websocket to /ws/dashboard/feed/<tenant id>/, one table row per finished
// request, newest on top. Reconnects after a drop (1 s, then up to 30 s between tries).
(function () {
  "use strict";
  var table = document.getElementById("feed");
  var state = document.getElementById("feed-state");
  if (!table) { return; }
  var body = table.querySelector("tbody");
  var detail = table.getAttribute("data-detail");
  var tenant = table.getAttribute("data-tenant");
  var KEEP = 200;
  var wait = 1000;

  function setState(name, text) { state.setAttribute("data-state", name); state.textContent = text; }

  function cell(row, text) { var td = document.createElement("td"); td.textContent = text; row.appendChild(td); return td; }

  function add(r) {
    var tr = document.createElement("tr");
    tr.className = "fresh";
    tr.setAttribute("data-request-id", r.request_id);
    cell(tr, (r.created_at || "").slice(0, 19).replace("T", " "));
    var link = document.createElement("a");
    link.href = detail.replace("REQUEST_ID", encodeURIComponent(r.request_id));
    link.textContent = r.request_id;
    cell(tr, "").appendChild(link);
    cell(tr, r.route);
    cell(tr, r.model);
    cell(tr, r.status + " " + r.http_status);
    cell(tr, r.cache);
    cell(tr, r.input_tokens + " / " + r.output_tokens);
    cell(tr, "$" + r.cost_usd);
    cell(tr, r.latency_ms + " ms");
    body.insertBefore(tr, body.firstChild);
    while (body.children.length > KEEP) { body.removeChild(body.lastChild); }
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var ws = new WebSocket(scheme + location.host + "/ws/dashboard/feed/" + tenant + "/");
    ws.onopen = function () { wait = 1000; setState("open", "live"); };
    ws.onmessage = function (event) { add(JSON.parse(event.data)); };
    ws.onclose = function (event) {
      if (event.code === 4401 || event.code === 4403) { setState("closed", "not allowed: sign in again"); return; }
      setState("closed", "reconnecting…");
      setTimeout(connect, wait);
      wait = Math.min(wait * 2, 30000);
    };
  }
  connect();
})();
