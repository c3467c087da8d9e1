"""The peers' API between two real ingest servers over mutual TLS (tests/pair.py's sites).

No blind window (exists and status ask the peer before MISSING), one publication for a CID
sent to both servers, the claim's tie-break between two pending uploads, only peers' host
certificates trusted, and a peer that is down answered from this host's copies.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import ssl

import pytest
import requests

from ingest.peer_handlers import Uploads
from spool import Spool
from tests.helpers import make_tarball, publishers_alive, run_userpub, tar_body, wait_for
from tests.pair import PairSites
from tests.pki import running_ingest

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def pair(tmp_path):
    sites = PairSites(tmp_path)
    a, b = sites["pubA"].config, sites["pubB"].config
    assert a is not None and b is not None
    with publishers_alive(a), publishers_alive(b), running_ingest(a), running_ingest(b):
        yield sites


def get(pki, base: str, route: str, cid: str) -> requests.Response:
    return requests.get(f"{base}/pubapi/{route}", params={"cid": cid}, cert=pki.cert("proxy"),
                        verify=str(pki.ca_file), timeout=60)


def test_a_cid_just_published_on_the_peer_is_present_here_at_once(tmp_path):
    """B's replica of A's repositories has not pulled yet: B asks A, which has it."""
    sites = PairSites(tmp_path)
    a, b = sites["pubA"], sites["pubB"]
    assert a.config is not None and b.config is not None
    run_userpub(a.config.path, "keys", "init", "repo1.example.org")
    tarball = make_tarball(tmp_path / "code.tar.gz", {"bin/run": b"echo hi\n"})
    cid = "grp/" + hashlib.sha256(tarball.read_bytes()).hexdigest()
    run_userpub(a.config.path, "drop", str(tarball), "--cid", cid)
    run_userpub(a.config.path, "publisher", "--repo", "repo1.example.org", "--once",
                timeout=300)
    with publishers_alive(a.config), publishers_alive(b.config), running_ingest(a.config), \
            running_ingest(b.config):
        present = f"PRESENT:/cvmfs/repo1.example.org/sw/{cid}\n"
        assert get(sites.pki, b.base, "exists", cid).text == present
        assert get(sites.pki, b.base, "status", cid).text == present
        assert get(sites.pki, b.base, "update", cid).text == present
        # stamped here: B's own repositories keep the newest use, which A reads in its replica
        assert [p.name for p in Spool(b.config.server.spool).incoming.iterdir()] == \
            [cid.replace("/", "%2F") + "@stamp"]
        r = requests.post(f"{b.base}/pubapi/publish", params={"cid": cid},
                          data=tarball.read_bytes(), cert=sites.pki.cert("proxy"),
                          verify=str(sites.pki.ca_file), timeout=60)
        assert (r.status_code, r.text) == (200, present)  # A's claim answer: nothing spooled


def test_a_cid_queued_on_the_peer_is_queued_here_too_and_never_uploaded_twice(pair):
    pki = pair.pki
    a, b = pair["pubA"], pair["pubB"]
    body = tar_body(200_000)
    cid = "grp/" + hashlib.sha256(body).hexdigest()
    r = requests.post(f"{a.base}/pubapi/publish", params={"cid": cid}, data=body,
                      cert=pki.cert("proxy"), verify=str(pki.ca_file), timeout=60)
    assert (r.status_code, r.text) == (200, "OK\n")
    assert get(pki, b.base, "status", cid).text == "QUEUED\n"  # what A says: no blind window
    again = requests.post(f"{b.base}/pubapi/publish", params={"cid": cid}, data=body,
                          cert=pki.cert("proxy"), verify=str(pki.ca_file), timeout=60)
    assert (again.status_code, again.text) == (200, "OK\n")  # read and discarded: A has it
    assert b.config is not None and a.config is not None
    assert list(Spool(b.config.server.spool).incoming.iterdir()) == []
    assert [p.name for p in Spool(a.config.server.spool).incoming.iterdir()] == \
        [cid.replace("/", "%2F")]


def test_one_cid_sent_to_both_servers_at_once_is_spooled_once(pair):
    """A's upload is in progress (its claim granted) when B's arrives: B discards it."""
    pki = pair.pki
    a, b = pair["pubA"], pair["pubB"]
    body = tar_body(3_000_000)
    cid = "grp/" + hashlib.sha256(body).hexdigest()
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki["proxy"])
    slow = http.client.HTTPSConnection("127.0.0.1", a.https, context=ctx, timeout=60)
    slow.putrequest("POST", f"/pubapi/publish?cid={cid}")
    slow.putheader("Content-Length", str(len(body)))
    slow.endheaders()
    slow.send(body[:1_000_000])  # A has claimed the CID and is receiving it
    assert a.config is not None and b.config is not None

    def a_is_receiving() -> bool:
        return any(Spool(a.config.server.spool).tmp.iterdir())

    wait_for(a_is_receiving, 30)
    other = requests.post(f"{b.base}/pubapi/publish", params={"cid": cid}, data=body,
                          cert=pki.cert("proxy"), verify=str(pki.ca_file), timeout=60)
    assert (other.status_code, other.text) == (200, "OK\n")
    slow.send(body[1_000_000:])
    response = slow.getresponse()
    assert (response.status, response.read()) == (200, b"OK\n")
    slow.close()
    spooled = [p.name for c in (a.config, b.config)
               for p in Spool(c.server.spool).incoming.iterdir()]
    assert spooled == [cid.replace("/", "%2F")]
    assert list(Spool(b.config.server.spool).incoming.iterdir()) == []


def test_two_pending_uploads_are_decided_by_name():
    """Both claims in flight: the smaller server name keeps the CID, on either side."""
    a_side, b_side = Uploads(), Uploads()
    a_side.begin("grp/x")
    b_side.begin("grp/x")
    assert a_side.holds("grp/x", "pubA", "pubB")  # A answers B's claim: HELD
    assert not b_side.holds("grp/x", "pubB", "pubA")  # B answers A's claim: GRANTED
    b_side.confirm("grp/x")  # had B been granted first, its upload would hold against anyone
    assert b_side.holds("grp/x", "pubB", "pubA")
    b_side.end("grp/x", confirmed=True)
    a_side.end("grp/x", confirmed=False)
    assert not a_side.holds("grp/x", "pubA", "pubB")
    assert not b_side.holds("grp/x", "pubB", "pubA")


def test_only_the_peers_host_certificates_may_call_the_peer_routes(pair):
    pki = pair.pki
    a = pair["pubA"]
    b = pair["pubB"]
    user = requests.get(f"{a.base}/pubapi/peer/state", params={"cid": "grp/x"},
                        cert=pki.cert("proxy"), verify=str(pki.ca_file), timeout=30)
    assert (user.status_code, user.text) == (403, "Not a peer of this server\n")
    anonymous = requests.get(f"{a.base}/pubapi/peer/state", params={"cid": "grp/x"},
                             verify=str(pki.ca_file), timeout=30)
    assert (anonymous.status_code, anonymous.text) == (403, "Peer certificate required\n")
    peer = requests.get(f"{a.base}/pubapi/peer/state", params={"cid": "grp/x"},
                        cert=(str(b.certificate), str(b.key)), verify=str(pki.ca_file),
                        timeout=30)
    assert (peer.status_code, peer.text) == (200, "MISSING\n")
    lastuse = requests.post(f"{a.base}/pubapi/peer/lastuse", data="grp/x\ngrp/y\n",
                            cert=(str(b.certificate), str(b.key)), verify=str(pki.ca_file),
                            timeout=30)
    assert lastuse.json() == {"grp/x": None, "grp/y": None}


def test_a_peer_that_is_down_is_answered_from_this_hosts_copies(tmp_path, caplog):
    sites = PairSites(tmp_path)
    a = sites["pubA"]
    assert a.config is not None
    caplog.set_level(logging.WARNING, "userpub.peers")
    with publishers_alive(a.config), running_ingest(a.config):  # B never started
        for _ in range(3):
            answer = get(sites.pki, a.base, "exists", "grp/nowhere")
            assert (answer.status_code, answer.text) == (200, "MISSING\n")
        body = tar_body(50_000)
        r = requests.post(f"{a.base}/pubapi/publish", params={"cid": "grp/alone"}, data=body,
                          cert=sites.pki.cert("proxy"), verify=str(sites.pki.ca_file), timeout=60)
        assert (r.status_code, r.text) == (200, "OK\n")
    warnings = [r.getMessage() for r in caplog.records if r.name == "userpub.peers"]
    assert len(warnings) == 1  # once a minute per peer, not once per request
    assert "peer pubB" in warnings[0] and "answering from this host's copies" in warnings[0]
