from django.urls import path

from methodology import apis

urlpatterns = [
    path("standard/scenarios", apis.ScenarioListApi.as_view(), name="standard-scenarios"),
]
