"""The demo's own client side: what ``manage.py demo_traffic`` uses to act as institutions and a person.

Everything here talks to the hub over HTTP only, as a real institution's sender or a person's app would.
"""
