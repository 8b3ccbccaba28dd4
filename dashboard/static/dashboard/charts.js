// The overview's chart: spend per day, stacked by model. Data comes from the page's
// <script type="application/json" id="spend-data"> (never executed; the CSP allows no inline JS).
(function () {
  "use strict";
  var node = document.getElementById("spend-data");
  var canvas = document.getElementById("spend-chart");
  if (!node || !canvas || typeof Chart === "undefined") { return; }
  var data = JSON.parse(node.textContent);
  new Chart(canvas, {
    type: "bar",
    data: data,
    options: {
      animation: false,
      responsive: true,
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "USD" } } },
      plugins: { legend: { position: "bottom" } }
    }
  });
})();
