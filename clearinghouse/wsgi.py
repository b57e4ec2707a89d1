import os

from django.core.wsgi import get_wsgi_application

from clearinghouse.bodies import ChunkedBodies

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")
# Chunked request bodies are read in full (or refused with 411) before Django sees the request.
application = ChunkedBodies(get_wsgi_application())
