"""Which datapath ids a switch's TLS certificate lets it announce.

A switch is known by the datapath id it announces in its features reply.  With a switch CA
(``--tls-switch-ca``) the handshake proves only that the operator's CA signed the switch's
certificate: any such switch could announce another hypervisor's id, take its place and
its middleboxes' flows.  So the certificate itself names the ids its switch may announce,
as subjectAltName URIs ``urn:mbvisor:dpid:<16 hex digits>`` (one per bridge of the host),
and a switch announcing an id its certificate does not name is refused.  An operator who
cannot issue such certificates yet says so (``MBVISOR_TLS_SWITCH_IDS=any``) and gets the
behaviour before this check, with a warning at start.

Pure: the certificate is the dict ``ssl.SSLSocket.getpeercert()`` gives.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DPID_URI = "urn:mbvisor:dpid:"
_DPID_URI = re.compile(re.escape(DPID_URI) + "([0-9a-fA-F]{16})")

CERTIFICATE = "certificate"  # a switch announces only the ids its certificate names (the default)
ANY = "any"                  # any id (before this check; a warning at start)
SWITCH_ID_MODES = (CERTIFICATE, ANY)


def named_datapaths(certificate: dict | None) -> frozenset[int]:
    """The datapath ids the certificate's subjectAltName URIs name (others are ignored)."""
    names = (value for kind, value in (certificate or {}).get("subjectAltName", ()) if kind == "URI")
    return frozenset(int(found.group(1), 16) for found in map(_DPID_URI.fullmatch, names) if found)


class Refusal(NamedTuple):
    """Why a switch may not be the datapath it announces: ``kind`` (one of three, for
    rate-limited logging) and the reason in words."""

    kind: str
    text: str


def refusal(dpid: int, certificate: dict | None) -> Refusal | None:
    """Why a switch with this certificate may not be ``dpid``; None if it may."""
    if not certificate:
        return Refusal("no-certificate", "it presented no certificate")
    named = named_datapaths(certificate)
    if dpid in named:
        return None
    if not named:
        return Refusal("no-id", f"its certificate names no datapath id (a subjectAltName URI {DPID_URI}<16 hex digits>)")
    return Refusal("other-id", f"its certificate names {', '.join(f'{d:016x}' for d in sorted(named))} only")
