"""The persons' pages, at the site's root. The names in :data:`portal.nav.NAV` that are not routed here
yet (activity, link, rewards, redemptions, privacy) are the ones the pages still to come take."""

from django.urls import path

from portal import views

app_name = "portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("signin/", views.signin, name="signin"),
    path("signup/", views.signup, name="signup"),
    path("signout/", views.signout, name="signout"),
    path("password/", views.password_change, name="password_change"),
    path("standard/", views.standard, name="standard"),
    # Browsers ask every site for /favicon.ico, on the admin's and the API docs' pages too.
    path("favicon.ico", views.favicon),
]
