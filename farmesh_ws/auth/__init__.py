"""Credentials to principals: API keys, Sign-In with Ethereum (EIP-4361) sessions, anonymous
use where the operator allows it (:class:`~farmesh_ws.core.principal.Principal`)."""
