"""The demo: ``manage.py demo_setup`` and ``manage.py demo_traffic``, and the client side they use to act
as institutions and a person (``client``, ``receiver``, ``stories``).

The traffic goes over HTTP only, as a real institution's sender or a person's app would; the commands
call the hub's services only where an operator would act (registering institutions and rewards, running
a settlement cycle).
"""
