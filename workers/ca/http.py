"""The CA's HTTP face for relying parties: OCSP (RFC 6960 Appendix A) and CRLs.

POST /  or  POST /ocsp          body: DER OCSPRequest  → application/ocsp-response
GET  /ocsp/<base64 request>     the same, RFC 6960 §A.1 GET form
GET  /crl/<kind>.crl            current CRL of the active generation (DER)
GET  /crl/<kind>-g<N>.crl       current CRL of generation N (DER)
GET  /ca/<kind>-g<N>.crt        the CA certificate of generation N (DER)
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote

import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from workers.ca.authority import CertificateAuthority
from workers.ca.errors import InvalidRequest
from workers.ca.profiles import CaKind

log = structlog.get_logger("ca.http")

OCSP_REQUEST_LIMIT = 16 * 1024
_NAME = re.compile(r"^(auth|sign)(?:-g([0-9]{1,4}))?$")
AUTHORITY: web.AppKey[CertificateAuthority] = web.AppKey("authority", CertificateAuthority)


def make_app(authority: CertificateAuthority) -> web.Application:
    app = web.Application(client_max_size=OCSP_REQUEST_LIMIT)
    app[AUTHORITY] = authority
    app.add_routes(
        [
            web.post("/", _ocsp_post),
            web.post("/ocsp", _ocsp_post),
            web.get("/ocsp/{request:.+}", _ocsp_get),
            web.get("/crl/{name}.crl", _crl),
            web.get("/ca/{name}.crt", _ca_certificate),
        ]
    )
    return app


async def _answer(request: web.Request, der: bytes) -> web.Response:
    response = await request.app[AUTHORITY].ocsp(der)
    return web.Response(body=response, content_type="application/ocsp-response")


async def _ocsp_post(request: web.Request) -> web.Response:
    return await _answer(request, await request.read())


async def _ocsp_get(request: web.Request) -> web.Response:
    try:
        der = base64.b64decode(unquote(request.match_info["request"]), validate=True)
    except (binascii.Error, ValueError):
        der = b""  # answered as malformedRequest by the responder
    return await _answer(request, der)


def _generation(name: str) -> tuple[CaKind, int | None]:
    match = _NAME.match(name)
    if match is None:
        raise web.HTTPNotFound()
    return CaKind(match.group(1)), int(match.group(2)) if match.group(2) else None


async def _crl(request: web.Request) -> web.Response:
    kind, generation = _generation(request.match_info["name"])
    try:
        crl = await request.app[AUTHORITY].crl(kind, generation)
    except InvalidRequest:
        raise web.HTTPNotFound() from None
    return web.Response(body=crl, content_type="application/pkix-crl")


async def _ca_certificate(request: web.Request) -> web.Response:
    kind, generation = _generation(request.match_info["name"])
    try:
        issuer = request.app[AUTHORITY].issuer(kind, generation)
    except InvalidRequest:
        raise web.HTTPNotFound() from None
    return web.Response(
        body=issuer.certificate.public_bytes(serialization.Encoding.DER),
        content_type="application/pkix-cert",
    )


async def serve(authority: CertificateAuthority, host: str, port: int) -> web.AppRunner:
    """Start serving; the caller keeps the runner and calls ``runner.cleanup()`` to stop."""
    runner = web.AppRunner(make_app(authority), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("ca.http_listening", host=host, port=port)
    return runner
