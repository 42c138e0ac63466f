"""Sign-in throttling: django-axes' per username-and-address limit, plus one per address alone.

Axes counts failures per (username, address), which stops guessing one account's password but not
credential stuffing: one address trying a leaked password list against many accounts fails each
username once or twice. The address's own count, over every username, catches that; its limit
(``PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT``) is higher, so that an office behind one NAT address is
not locked out by a few colleagues' typos. Counts live in the same cache as axes' (Redis).
"""

from __future__ import annotations

from axes.handlers.cache import AxesCacheHandler
from axes.helpers import get_cache_timeout, get_client_username
from axes.signals import user_locked_out
from django.conf import settings


def _address_key(request) -> str | None:
    address = getattr(request, "axes_ip_address", None)
    return f"parley:login:address-failures:{address}" if address else None


class AddressAwareAxesHandler(AxesCacheHandler):
    def _address_failures(self, request) -> int:
        key = _address_key(request)
        return int(self.cache.get(key, default=0)) if key else 0

    def is_locked(self, request, credentials: dict | None = None) -> bool:
        if super().is_locked(request, credentials):
            return True
        return self._address_failures(request) >= settings.PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT

    def user_login_failed(self, sender, credentials: dict, request=None, **kwargs):
        super().user_login_failed(sender, credentials, request=request, **kwargs)
        key = _address_key(request) if request is not None else None
        if key is None or self.is_whitelisted(request, credentials):
            return
        timeout = get_cache_timeout(request)
        if self.cache.add(key=key, value=1, timeout=timeout):
            failures = 1
        else:
            failures = self.cache.incr(key=key, delta=1)
            self.cache.touch(key=key, timeout=timeout)
        if failures >= settings.PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT and not request.axes_locked_out:
            request.axes_locked_out = True
            request.axes_credentials = credentials
            user_locked_out.send(
                "axes",
                request=request,
                username=get_client_username(request, credentials),
                ip_address=request.axes_ip_address,
            )
