"""Which datapath ids a switch's TLS certificate lets it announce (controller/switchid.py):
the pure check, on certificates as ``ssl.getpeercert()`` gives them, tried with the names
an impostor would try (another id, an id in the CN or a DNS name, a short or long hex, no
certificate at all).  The real controller and switch: tests/test_tls.py."""

from __future__ import annotations

import pytest

from mbvisor.controller.service import Settings
from mbvisor.controller.switchid import DPID_URI, named_datapaths, refusal

DPID = 0x00004D42400A0001


def certificate(*names: tuple[str, str], common_name: str = "switch") -> dict:
    return {"subject": ((("commonName", common_name),),), "subjectAltName": names}


def test_a_certificate_names_the_ids_of_its_subject_alt_name_uris():
    cert = certificate(("URI", f"{DPID_URI}{DPID:016x}"), ("URI", f"{DPID_URI}00004D42400A0002"),
                       ("DNS", "hv1.example"))
    assert named_datapaths(cert) == {DPID, 0x00004D42400A0002}
    assert refusal(DPID, cert) is None
    assert refusal(0x00004D42400A0002, cert) is None


@pytest.mark.parametrize("names, common_name", [
    ((("DNS", f"{DPID_URI}{DPID:016x}"),), "switch"),                  # not a URI
    ((), f"{DPID_URI}{DPID:016x}"),                                    # the subject's CN is not looked at
    ((("URI", f"{DPID_URI}{DPID:x}"),), "switch"),                     # fewer than 16 digits
    ((("URI", f"{DPID_URI}0{DPID:016x}"),), "switch"),                 # more
    ((("URI", f"{DPID_URI}{DPID:016x}/x"),), "switch"),                # trailing text
    ((("URI", f"urn:other:dpid:{DPID:016x}"),), "switch"),             # another scheme
], ids=["dns", "common-name", "short", "long", "trailing", "other-urn"])
def test_only_an_exact_uri_names_an_id(names, common_name):
    cert = certificate(*names, common_name=common_name)
    assert named_datapaths(cert) == frozenset()
    assert refusal(DPID, cert) == ("no-id", f"its certificate names no datapath id (a subjectAltName URI "
                                            f"{DPID_URI}<16 hex digits>)")


def test_a_switch_announcing_an_id_its_certificate_does_not_name_is_told_which_it_names():
    cert = certificate(("URI", f"{DPID_URI}00004d42400a0002"))
    assert refusal(DPID, cert) == ("other-id", "its certificate names 00004d42400a0002 only")


@pytest.mark.parametrize("cert", [None, {}])
def test_no_certificate_is_refused(cert):
    assert refusal(DPID, cert) == ("no-certificate", "it presented no certificate")


def test_the_check_is_on_unless_the_operator_turns_it_off():
    assert Settings.from_environment({}).switch_ids == "certificate"
    assert Settings.from_environment({"MBVISOR_TLS_SWITCH_IDS": ""}).switch_ids == "certificate"  # set but empty: unset
    assert Settings.from_environment({"MBVISOR_TLS_SWITCH_IDS": "any"}).switch_ids == "any"
    with pytest.raises(ValueError, match="MBVISOR_TLS_SWITCH_IDS must be 'certificate' or 'any', not 'none'"):
        Settings.from_environment({"MBVISOR_TLS_SWITCH_IDS": "none"})
