from django.urls import path

from wallets import apis

urlpatterns = [
    path("auth/signup", apis.SignupApi.as_view(), name="auth-signup"),
    path("auth/token", apis.TokenApi.as_view(), name="auth-token"),
    path("me/link-codes", apis.LinkCodeCreateApi.as_view(), name="link-codes-create"),
    path("me/links", apis.LinkListApi.as_view(), name="links-list"),
    path("me/links/<str:institution>", apis.LinkDeleteApi.as_view(), name="links-delete"),
    path("me/wallet", apis.WalletApi.as_view(), name="wallet"),
    path("me/activities", apis.ActivityListApi.as_view(), name="activities-list"),
    path("me/export", apis.ExportApi.as_view(), name="me-export"),
    path("me", apis.MeApi.as_view(), name="me"),
]
