from django.urls import path

from settlement import apis

urlpatterns = [
    path("institutions/<str:code>/settlements", apis.SettlementStatementListApi.as_view(), name="settlements-list"),
    path("rewards", apis.RewardListApi.as_view(), name="rewards-list"),
    path("me/redemptions", apis.RedemptionsApi.as_view(), name="redemptions"),
]
