from django.urls import path

from settlement import apis

urlpatterns = [
    path("institutions/<str:code>/settlements", apis.SettlementStatementListApi.as_view(), name="settlements-list"),
]
