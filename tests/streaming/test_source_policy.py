"""The source policy: schemes, hosts and addresses, the media root, redirects, re-checks."""

import http.server
import threading
import time

import pytest

from flashcache_sglang.streaming.memory import InProcessMemoryBackend
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.source_policy import HostEntry, SourcePolicy, SourcePolicyError, follow_redirects
from flashcache_sglang.streaming.sources import BackoffSettings, SamplingSettings, SourceOpenError, open_source
from flashcache_sglang.streaming.store import InMemoryStore


def resolver(table):
    def resolve(host, port):
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return resolve


DNS = resolver({
    "cam.example.com": ["93.184.216.34"],
    "mixed.example.com": ["93.184.216.34", "10.1.2.3"],
    "lan.example.com": ["192.168.1.20"],
    "rebind.example.com": ["127.0.0.1"],
    "meta.example.com": ["169.254.169.254"],
    "v6.example.com": ["2606:4700::1111"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "nat64.example.com": ["64:ff9b::7f00:1"],
})


def refused(policy, source):
    with pytest.raises(SourcePolicyError) as caught:
        policy.check(source)
    assert f"rule '{caught.value.rule}'" in str(caught.value)
    return caught.value.rule


@pytest.mark.parametrize(
    "text, pattern, network, port",
    [
        ("*", "*", None, None),
        ("*.Cams.example.com:554", "*.cams.example.com", None, 554),
        ("10.20.0.0/16", None, "10.20.0.0/16", None),
        ("127.0.0.1:8554", None, "127.0.0.1/32", 8554),
        ("[::1]:8554", None, "::1/128", 8554),
        ("fd00::/8", None, "fd00::/8", None),
        ("[fd00::/8]:554", None, "fd00::/8", 554),
    ],
)
def test_host_entries(text, pattern, network, port):
    entry = HostEntry.parse(text)
    assert (entry.pattern, str(entry.network) if entry.network else None, entry.port) == (pattern, network, port)


@pytest.mark.parametrize("text", ["cam:99999", "cam:abc", "[::1", "bad host", "a/b/c", ""])
def test_bad_host_entries_name_the_entry(text):
    with pytest.raises(ValueError, match="host entry"):
        HostEntry.parse(text)


def test_default_policy():
    policy = SourcePolicy(resolver=DNS)
    assert policy.check("rtsp://user:pw@cam.example.com/live").url == "rtsp://user:pw@cam.example.com/live"
    assert policy.check("https://v6.example.com/x.mp4").is_live is False
    assert refused(policy, "/etc/passwd") == "media_root"
    assert refused(policy, "file:///etc/hostname") == "media_root"
    assert refused(policy, "rtmp://cam.example.com/live") == "scheme"
    assert refused(policy, "gopher://cam.example.com/") == "scheme"
    for host in ["127.0.0.1:30000", "[::1]", "0.0.0.0", "10.0.0.1", "169.254.169.254", "224.0.0.1", "192.0.2.1",
                 "rebind.example.com", "meta.example.com", "mixed.example.com", "lan.example.com",
                 "mapped.example.com", "nat64.example.com", "[::ffff:127.0.0.1]", "100.64.0.1"]:
        assert refused(policy, f"http://{host}/flush_cache") == "address", host


def test_unresolvable_and_private_answer_alike():
    policy = SourcePolicy(resolver=DNS)
    messages = []
    for host in ["nowhere.example.com", "lan.example.com"]:
        with pytest.raises(SourcePolicyError) as caught:
            policy.check(f"rtsp://{host}/x")
        messages.append(str(caught.value).replace(host, "H"))
    assert messages[0] == messages[1]


def test_explicit_entries():
    policy = SourcePolicy(hosts=("*.example.com", "127.0.0.1:8554", "10.9.0.0/16"), allow_private=True, resolver=DNS)
    policy.check("rtsp://127.0.0.1:8554/cam")  # explicit loopback camera
    assert refused(policy, "http://127.0.0.1:30000/flush_cache") == "host"  # another loopback port
    policy.check("rtsp://lan.example.com/x")  # a name in a private network, allowed by allow_private
    policy.check("rtsp://10.9.3.4/x")
    assert refused(policy, "rtsp://10.10.0.1/x") == "host"
    assert refused(policy, "rtsp://rebind.example.com/x") == "address"  # a name never reaches loopback
    assert refused(policy, "rtsp://elsewhere.org/x") == "host"
    assert refused(policy, "rtsp://cam.example.com\\@127.0.0.1/x") == "url"
    assert refused(policy, "rtsp://cam.example.com:99999/x") == "url"
    assert refused(policy, "rtsp:///nohost") == "url"


def test_policy_errors_keep_credentials_out():
    policy = SourcePolicy(schemes=("rtsp",), resolver=DNS)
    with pytest.raises(SourcePolicyError) as caught:
        policy.check("http://admin:hunter2@cam.example.com/x?token=abc")
    assert "hunter2" not in str(caught.value) and "abc" not in str(caught.value)


def test_media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    video = root / "sub" / "a.mp4"
    video.write_bytes(b"x")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"x")
    (root / "escape").symlink_to(tmp_path)
    (root / "inside-link.mp4").symlink_to(video)
    policy = SourcePolicy(media_root=str(root))
    assert policy.check("sub/a.mp4").url == str(video.resolve())
    assert policy.check(str(video)).kind == "file"
    assert policy.check(f"file://{video}").url == str(video.resolve())
    assert policy.check("inside-link.mp4").url == str(video.resolve())  # a link that stays inside is fine
    for source in [str(secret), "../secret.mp4", "sub/../../secret.mp4", "escape/secret.mp4", f"file://{secret}",
                   "escape/missing.mp4", "/etc/passwd"]:
        assert refused(policy, source) == "media_root", source
    with pytest.raises(Exception, match="does not exist in the media root"):
        policy.check("sub/missing.mp4")
    assert refused(policy, "sub/a\x00.mp4") == "url"


def test_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'schemes = ["rtsp"]\nhosts = ["127.0.0.1:8554"]\nmedia_root = "{tmp_path}"\n')
    policy = SourcePolicy.from_file(str(path))
    assert policy.schemes == ("rtsp",) and policy.hosts == ("127.0.0.1:8554",) and policy.media_root == str(tmp_path.resolve())
    path.write_text('schemes = ["rtsp"]\nhost = ["x"]\n')
    with pytest.raises(ValueError, match=r"unknown keys \['host'\]"):
        SourcePolicy.from_file(str(path))
    path.write_text('schemes = ["file"]\n')
    with pytest.raises(ValueError, match="not network schemes"):
        SourcePolicy.from_file(str(path))
    path.write_text('media_root = "/no/such/folder"\n')
    with pytest.raises(ValueError, match="not a directory"):
        SourcePolicy.from_file(str(path))


class Redirector(http.server.BaseHTTPRequestHandler):
    """Serves one video at /video.mp4; /to?url=... redirects there."""

    video = b""

    def do_GET(self):
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):])
            self.end_headers()
            return
        if self.path != "/video.mp4":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.video)))
        self.end_headers()
        self.wfile.write(self.video)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(videos):
    Redirector.video = videos["short"].read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_redirects_are_checked_hop_by_hop(http_server):
    port = http_server.rsplit(":", 1)[1]
    policy = SourcePolicy(hosts=(f"127.0.0.1:{port}",))
    assert follow_redirects(f"{http_server}/video.mp4", policy) == f"{http_server}/video.mp4"
    assert follow_redirects(f"{http_server}/to//video.mp4", policy) == f"{http_server}/video.mp4"
    with pytest.raises(SourcePolicyError, match="redirects to a refused location") as caught:
        follow_redirects(f"{http_server}/to/http://127.0.0.1:1/flush_cache", policy)
    assert caught.value.rule == "host"
    with pytest.raises(SourcePolicyError) as caught:
        follow_redirects(f"{http_server}/to/file:///etc/passwd", policy)
    assert caught.value.rule == "scheme"


def test_http_source_through_the_manager(http_server):
    port = http_server.rsplit(":", 1)[1]
    manager = StreamManager(InMemoryStore(), InProcessMemoryBackend(), source_policy=SourcePolicy(hosts=(f"127.0.0.1:{port}",)))
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112))
    good, _ = manager.start_stream(f"{http_server}/to//video.mp4", config)
    bad, _ = manager.start_stream(f"{http_server}/to/http://127.0.0.1:1/flush_cache", config)
    assert manager.wait(good, 60) and manager.wait(bad, 60)
    assert manager.store.get_stream(good).status == "finished" and manager.store.get_stream(good).chunks_ingested == 6
    record = manager.store.get_stream(bad)
    assert record.status == "failed" and "rule 'host'" in record.error, record.error
    manager.shutdown()


def test_reconnects_are_checked_again():
    """A live source whose name starts resolving to loopback is not reopened."""
    answers = {"cam.example.com": ["93.184.216.34"]}
    policy = SourcePolicy(resolver=resolver(answers))
    spec = policy.check("rtsp://cam.example.com/live")
    answers["cam.example.com"] = ["127.0.0.1"]
    states = []
    source = open_source(spec, SamplingSettings(), backoff=BackoffSettings(initial_s=0.01, max_s=0.01, open_attempts=2),
                         on_state=lambda state, message: states.append(message), policy=policy)
    started = time.monotonic()
    with pytest.raises(SourceOpenError, match="rule 'address'"):
        next(iter(source.frames()))
    assert time.monotonic() - started < 5 and states and "rule 'address'" in states[0]
