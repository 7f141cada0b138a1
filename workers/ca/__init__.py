"""The JPKI CA worker: card-signature check, phase-3 state check, issuance, suspension and
revocation, CRL and OCSP. Start with ``workers.ca.authority`` (its docstring shows usage)."""

from workers.ca.application import Application, SeIdentity, sha256_digest_info
from workers.ca.authority import (
    CardCertificates,
    CertificateAuthority,
    IssuedCertificate,
    KeyRequest,
    Person,
)
from workers.ca.keystore import Passphrase
from workers.ca.profiles import BasicFacts, CaKind, CertType, Sex
from workers.ca.revocation import Cause, Status
from workers.ca.state_check import Branch

__all__ = [
    "Application",
    "BasicFacts",
    "Branch",
    "CaKind",
    "CardCertificates",
    "Cause",
    "CertType",
    "CertificateAuthority",
    "IssuedCertificate",
    "KeyRequest",
    "Passphrase",
    "Person",
    "SeIdentity",
    "Sex",
    "Status",
    "sha256_digest_info",
]
