"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from aiohttp import web

from ..openai_wire import ErrorBody


class ApiError(Exception):
    """A request the API refuses; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 404:
            return "not_found_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body().to_json(), status=self.status)


def from_http_exception(err: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (too large, not found, wrong method) in the same shape."""
    messages = {
        413: "Request body is too large",
        404: "No such endpoint",
        405: "Method not allowed for this endpoint",
    }
    message = messages.get(err.status, err.reason or "Request refused")
    if err.status == 413 and err.text:
        message = f"Request body is too large ({err.text.strip()})"
    return ApiError(err.status, message, code=err.reason.lower().replace(" ", "_") if err.reason else None)
