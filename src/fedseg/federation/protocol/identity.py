"""Which site a certificate stands for: the one rule shared by TLS peers and secure aggregation's relayed keys."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedseg.errors import FedsegError

__all__ = ["SITE_URI_PREFIX", "site_identity"]

SITE_URI_PREFIX = "fedseg://site/"


def site_identity(cert: x509.Certificate) -> str:
    """The site name a certificate stands for.

    Read from the SAN URI ``fedseg://site/<name>``, falling back to the subject
    CN for certificates without one. The caller must have verified the
    certificate's chain first: the name is only as trustworthy as its issuer.

    Raises:
        FedsegError: the certificate carries neither.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(SITE_URI_PREFIX):
                return uri[len(SITE_URI_PREFIX):]
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names:
        value = common_names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    raise FedsegError(f"certificate {cert.subject.rfc4514_string()!r} carries no site identity")
