from __future__ import annotations

from django.urls import path

from dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("t/<slug:slug>/", views.overview, name="overview"),
    path("t/<slug:slug>/tree/", views.tree, name="tree"),
    path("t/<slug:slug>/keys/", views.keys, name="keys"),
    path("t/<slug:slug>/keys/<int:key_id>/revoke/", views.key_revoke, name="key_revoke"),
    path("t/<slug:slug>/keys/<int:key_id>/rotate/", views.key_rotate, name="key_rotate"),
    path("t/<slug:slug>/budgets/", views.budgets, name="budgets"),
    path("t/<slug:slug>/team/", views.team, name="team"),
    path("t/<slug:slug>/usage/", views.usage, name="usage"),
    path("t/<slug:slug>/usage.csv", views.usage_csv, name="usage_csv"),
    path("t/<slug:slug>/requests/<str:request_id>/", views.request_detail, name="request"),
    path("t/<slug:slug>/audit/", views.audit, name="audit"),
    path("t/<slug:slug>/live/", views.live, name="live"),
]
