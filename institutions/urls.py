from django.urls import path

from institutions import apis

urlpatterns = [
    path("institutions/<str:code>/events", apis.EventIntakeApi.as_view(), name="events-push"),
    path("institutions/<str:code>/events/<path:event_id>", apis.EventStatusApi.as_view(), name="events-status"),
    path("hub/keys", apis.HubKeysApi.as_view(), name="hub-keys"),
]
