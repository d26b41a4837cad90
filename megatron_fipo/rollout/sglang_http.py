"""JSON over HTTP to one SGLang server, standard library only (the trainer needs no SGLang install).

Two failure kinds, because the engine treats them differently: ``ServerUnavailable`` (connection
refused or reset, timeout: the server may be dead, retry elsewhere and restart it) and
``SGLangError`` (the server answered with an error: the request itself is wrong, retrying is futile).
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request


class ServerUnavailable(RuntimeError):
    pass


class SGLangError(RuntimeError):
    pass


class SGLangHTTP:
    def __init__(self, url: str, api_key: str = "", timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def post(self, path: str, payload: dict | None = None, timeout_s: float | None = None) -> dict:
        return self._call("POST", path, payload if payload is not None else {}, timeout_s)

    def get(self, path: str, timeout_s: float | None = None) -> dict:
        return self._call("GET", path, None, timeout_s)

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            self._call("GET", "/health", None, timeout_s)
            return True
        except (ServerUnavailable, SGLangError):
            return False

    def _call(self, method: str, path: str, payload: dict | None, timeout_s: float | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise SGLangError(f"{method} {self.url}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException) as err:
            raise ServerUnavailable(f"{method} {self.url}{path}: {err}") from None
        if not body:
            return {}
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return {"text": body.decode(errors="replace")}
