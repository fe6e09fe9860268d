"""The web page's server (`python -m minivlm.web`): answers equal `generate`'s, every bad request gets a
JSON error and the server keeps answering, and (where Chromium is installed) the page itself runs."""

import base64
import fcntl
import http.client
import io
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import pytest
from PIL import Image

from minivlm.web import server as web
from minivlm.infer.generate import SamplingConfig, encode_batch, generate
from minivlm.data.processing import load_image
from minivlm.data.prompt import user_turn
from minivlm.web.watch import watch

pytestmark = pytest.mark.skipif(not os.path.isfile(web.DEMO_WEIGHTS), reason="the demo model is not shipped here")
SAMPLE = os.path.join(web.SAMPLES_DIR, "shapes_3.png")
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def server():
    app = web.load_app()
    srv = web.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield app, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def request(port, method, path, body=None, headers=None):
    """-> (status, parsed JSON or text). body: a dict (sent as JSON), bytes or str (sent as is)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    is_json = r.getheader("Content-Type", "").startswith("application/json")
    return r.status, json.loads(data) if is_json else data


def raw_request(port, head: bytes) -> tuple[int, dict]:
    """Send request bytes over a plain socket (for headers http.client will not send); -> (status, JSON)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(body)


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def upload(port, path=SAMPLE) -> dict:
    with open(path, "rb") as f:
        status, img = request(port, "POST", "/api/image", {"data": base64.b64encode(f.read()).decode(), "name": "x"})
    assert status == 200, img
    return img


def reference(app, images, messages, max_new_tokens=64) -> list[int]:
    """What `generate` answers (greedy) for the same conversation, built through the same prompt path."""
    batch = encode_batch(app.model, app.tokenizer, [(images, messages)])
    out = generate(app.model, batch["input_ids"], batch["pixel_values"], batch["image_counts"], batch["attention_mask"],
                   SamplingConfig(max_new_tokens=max_new_tokens), eos_id=app.tokenizer.eos_id, pad_id=app.tokenizer.pad_id)
    return [t for t in out[0].tolist() if t != app.tokenizer.pad_id]


def test_streamed_answer_equals_generate(server):
    app, port = server
    img = upload(port)
    assert img["crop"].startswith("data:image/png;base64,")
    crop = Image.open(io.BytesIO(base64.b64decode(img["crop"].split(",", 1)[1])))
    assert crop.size == (app.image_size, app.image_size)
    status, text = request(port, "POST", "/api/chat", {"messages": [{"role": "user", "text": QUESTION, "images": [img["id"]]}]})
    assert status == 200, text
    evs = events(text)
    assert [e for e, _ in evs][0] == "prompt" and evs[-1][0] == "done"
    tokens = [d for e, d in evs if e == "token"]
    content = user_turn(QUESTION, 1, app.question_first)
    assert [t["id"] for t in tokens] == reference(app, [load_image(SAMPLE)], [{"role": "user", "content": content}])
    assert evs[-1][1]["reason"] == "eos" and evs[-1][1]["text"] == tokens[-1]["text"]
    assert "square" in evs[-1][1]["text"]
    blocks = [p for p in evs[0][1]["pieces"] if p["kind"] == "image"]
    assert len(blocks) == 1 and blocks[0]["count"] == app.model.run_length
    layers = app.model.config.num_hidden_layers
    for t in tokens:
        assert len(t["top"]) == 5 and t["top"][0][1] >= t["top"][-1][1] and 0 <= t["p"] <= 1
        assert len(t["attn"]) == layers and all(len(row) == app.model.run_length for row in t["attn"])
        assert all(0 < s <= 1.0001 for s in t["image_share"])


def test_watch_equals_generate_greedy(server):
    app, _ = server
    for name in ("shapes_1.png", "photo_cat.jpg"):
        messages = [{"role": "user", "content": user_turn(QUESTION, 1, app.question_first)}]
        images = [load_image(os.path.join(web.SAMPLES_DIR, name))]
        batch = encode_batch(app.model, app.tokenizer, [(images, messages)])
        got = [r["id"] for r in watch(app.model, batch, SamplingConfig(max_new_tokens=40), app.tokenizer.eos_id)]
        assert got == reference(app, images, messages, 40), name


def test_multi_turn_history_reaches_the_model(server):
    app, port = server
    a, b = upload(port), upload(port, os.path.join(web.SAMPLES_DIR, "shapes_1.png"))
    first = [{"role": "user", "text": "How many objects are there?", "images": [a["id"]]}]
    _, text = request(port, "POST", "/api/chat", {"messages": first, "sampling": {"max_new_tokens": 16}})
    answer1 = events(text)[-1][1]["text"]
    convo = first + [{"role": "assistant", "text": answer1}, {"role": "user", "text": QUESTION, "images": [b["id"]]}]
    status, text = request(port, "POST", "/api/chat", {"messages": convo, "sampling": {"max_new_tokens": 24}})
    assert status == 200, text
    evs = events(text)
    prompt_text = "".join(p["text"] for p in evs[0][1]["pieces"] if p["kind"] != "image")
    assert answer1 in prompt_text and sum(p["kind"] == "image" for p in evs[0][1]["pieces"]) == 2
    qf = app.question_first
    messages = [{"role": "user", "content": user_turn("How many objects are there?", 1, qf)},
                {"role": "assistant", "content": answer1}, {"role": "user", "content": user_turn(QUESTION, 1, qf)}]
    images = [load_image(SAMPLE), load_image(os.path.join(web.SAMPLES_DIR, "shapes_1.png"))]
    assert [d["id"] for e, d in evs if e == "token"] == reference(app, images, messages, 24)


def test_limits_and_stop(server, monkeypatch):
    app, port = server
    img = upload(port)
    msgs = [{"role": "user", "text": QUESTION, "images": [img["id"]]}]
    evs = events(request(port, "POST", "/api/chat", {"messages": msgs, "sampling": {"max_new_tokens": 3}})[1])
    assert evs[-1][1]["reason"] == "max_new_tokens" and evs[-1][1]["tokens"] == 3
    assert request(port, "POST", "/api/stop", {}) == (200, {"stopping": False})

    first_sent = threading.Event()

    def held(*args):  # after the first token, wait until the page presses stop
        for i, rec in enumerate(watch(*args)):
            yield rec
            if i == 0:
                first_sent.set()  # the server asked for the second token: the first one went out
                assert app.stop.wait(10)
    monkeypatch.setattr(web, "watch", held)
    result = {}
    reader = threading.Thread(target=lambda: result.update(r=request(port, "POST", "/api/chat", {"messages": msgs})))
    reader.start()
    assert first_sent.wait(60)  # press stop only once the first token is out (not during the prefill)
    assert request(port, "POST", "/api/stop", {}) == (200, {"stopping": True})
    reader.join(30)
    evs = events(result["r"][1])
    # stop arrived while the second token was being made: it is still sent, then the stream ends
    assert evs[-1][1]["reason"] == "stopped" and evs[-1][1]["tokens"] == 2

    with app.generating:  # someone else is generating
        status, err = request(port, "POST", "/api/chat", {"messages": msgs})
    assert status == 429 and "busy" in err["error"]


def png_header(w, h) -> bytes:
    """A PNG that claims w x h pixels and holds none (enough for Pillow's header checks)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_requests_get_json_errors_and_the_server_lives_on(server):
    app, port = server
    img = upload(port)
    big = io.BytesIO()
    Image.new("1", (5000, 4001)).save(big, format="PNG")  # 20,005,000 pixels, a few KB
    ok_msgs = [{"role": "user", "text": QUESTION, "images": [img["id"]]}]
    post = lambda path, body: ("POST", path, body)  # noqa: E731
    chat = lambda **kw: post("/api/chat", {"messages": ok_msgs, **kw})  # noqa: E731
    cases = [
        (400, post("/api/chat", "{not json")), (400, post("/api/image", "[1, 2]")),
        (400, post("/api/image", {"data": b64(b"certainly not an image")})),
        (400, post("/api/image", {"data": "%%% not base64"})), (400, post("/api/image", {"nothing": 1})),
        (413, post("/api/image", {"data": b64(big.getvalue())})),
        (413, post("/api/image", {"data": b64(png_header(20000, 20000))})),  # past Pillow's bomb limit too
        (400, post("/api/image", {"sample": "../../README.md"})),
        (404, ("GET", "/nope", None)), (404, ("GET", "/../minivlm/web.py", None)),
        (404, ("GET", "/%2e%2e/README.md", None)), (404, ("GET", "/web_static/../web.py", None)),
        (404, ("GET", "/api/../../setup.py", None)), (404, post("/api/nothing", {})), (405, ("PUT", "/", "")),
        (405, ("DELETE", "/api/chat", "")),
        (400, chat(sampling={"temperature": -1})), (400, chat(sampling={"temperature": "hot"})),
        (400, post("/api/chat", json.dumps({"messages": ok_msgs, "sampling": {"temperature": float("nan")}}))),
        (400, chat(sampling={"top_p": 0})), (400, chat(sampling={"top_k": 1.5})), (400, chat(sampling={"top_k": True})),
        (400, chat(sampling={"max_new_tokens": 10 ** 6})), (400, chat(sampling={"repetition_penalty": 0})),
        (400, chat(sampling={"seed": -1})), (400, chat(sampling={"temp": 1})), (400, chat(sampling=[1])),
        (400, post("/api/chat", {"messages": [{"role": "user", "text": QUESTION, "images": ["f00"]}]})),
        (400, post("/api/chat", {"messages": [{"role": "assistant", "text": "hi"}]})),
        (400, post("/api/chat", {"messages": ok_msgs + [{"role": "assistant", "text": "hi"}]})),
        (400, post("/api/chat", {"messages": [{"role": "user", "text": "<image> and <image>", "images": [img["id"]]}]})),
        (400, post("/api/chat", {"messages": [{"role": "user", "text": "x" * (web.MAX_TEXT_CHARS + 1)}]})),
        (400, post("/api/chat", {"messages": "hello"})),
    ]
    for status, (method, path, body) in cases:
        got, reply = request(port, method, path, body)
        assert (got, type(reply)) == (status, dict) and reply["error"], (method, path, str(body)[:80], got, reply)
        assert request(port, "GET", "/api/info")[0] == 200  # still serving
    # What http.client would not send: a body too large to read, none announced, a foreign Host (DNS
    # rebinding), a form post, a header line too long, an unknown method.
    head = "POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for status, req in [(413, f"{head}Content-Length: {web.MAX_BODY_BYTES + 1}\r\n\r\n"), (411, f"{head}\r\n"),
                        (403, "GET / HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n"),
                        (415, "POST /api/stop HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                              "Content-Length: 2\r\n\r\n{}"),
                        (431, f"GET / HTTP/1.1\r\nX: {'a' * 70000}\r\n\r\n"),
                        (501, "BREW / HTTP/1.1\r\nHost: localhost\r\n\r\n")]:
        got, reply = raw_request(port, req.encode())
        assert got == status and reply["error"], (req, got, reply)
    assert request(port, "GET", "/api/info")[1]["image_size"] == app.image_size


def test_malformed_bodies_get_400_not_500(server):
    """What once reached a 500: a data URL without its comma, a 400-digit integer, JSON nested 10 KB deep, half a
    UTF-16 surrogate pair in the text. Each is the client's mistake: a 400 that says what is wrong."""
    _, port = server
    img = upload(port)
    ok_msgs = [{"role": "user", "text": QUESTION, "images": [img["id"]]}]
    huge = "9" * 400
    cases = [
        ("/api/image", json.dumps({"data": "data:image/png;base64", "name": "a.png"}), "comma"),
        ("/api/image", json.dumps({"data": "data:image/png," + b64(b"x"), "name": "a.png"}), "base64"),
        ("/api/chat", '{"messages": %s, "sampling": {"max_new_tokens": %s}}' % (json.dumps(ok_msgs), huge), "max_new_tokens"),
        ("/api/chat", '{"messages": %s, "sampling": {"temperature": -%s}}' % (json.dumps(ok_msgs), huge), "temperature"),
        ("/api/chat", '{"messages": %s, "sampling": {"seed": %s}}' % (json.dumps(ok_msgs), huge), "seed"),
        ("/api/chat", '{"messages": ' + "[" * 10000 + "]" * 10000 + "}", "nests"),
        ("/api/chat", "[" * 10000, "nests"),
        ("/api/chat", r'{"messages": [{"role": "user", "text": "a \ud800 b"}]}', "surrogate"),
        ("/api/image", r'{"data": "%s", "name": "\udfff.png"}' % b64(b"x"), "surrogate"),
    ]
    for path, body, word in cases:
        got, reply = request(port, "POST", path, body)
        assert got == 400 and word in reply["error"], (body[:80], got, reply)
        assert len(reply["error"]) < 300 and "\n" not in reply["error"]  # one line, and not the 400 digits
    assert request(port, "GET", "/api/info")[0] == 200


def test_unreadable_upload_is_named_by_its_file_name(server):
    _, port = server
    got, reply = request(port, "POST", "/api/image", {"data": b64(b"certainly not an image"), "name": "holiday.jpg"})
    assert got == 400 and reply["error"].startswith("holiday.jpg ") and "BytesIO" not in reply["error"], reply
    got, reply = request(port, "POST", "/api/image", {"data": b64(png_header(20000, 20000)), "name": "big.png"})
    assert got == 413 and "big.png" in reply["error"] and "BytesIO" not in reply["error"], reply


def test_upload_limit_is_one_number_the_server_reports(server):
    """The page checks files against limits.max_upload_bytes; a file of exactly that size, sent the way the page
    sends it (a data URL in JSON, a long name), fits the body limit, and one byte more is refused, by name."""
    app, port = server
    limits = request(port, "GET", "/api/info")[1]["limits"]
    assert limits["max_upload_bytes"] == web.MAX_UPLOAD_BYTES and limits["max_upload"] == "15 MB"
    body = json.dumps({"data": "data:image/jpeg;base64," + b64(bytes(web.MAX_UPLOAD_BYTES)), "name": "\u00e9" * 255})
    assert len(body.encode()) <= limits["max_body_bytes"]
    with pytest.raises(web.HTTPError) as e:
        app.add_image({"data": b64(bytes(web.MAX_UPLOAD_BYTES + 1)), "name": "photo.jpg"})
    assert e.value.status == 413 and str(e.value) == "photo.jpg is 15.0 MB; the limit is 15 MB"
    with pytest.raises(web.HTTPError) as e:
        app.add_image({"data": "data:image/jpeg;base64," + b64(bytes(18_200_000)), "name": "photo.jpg"})
    assert e.value.status == 413 and str(e.value) == "photo.jpg is 18.2 MB; the limit is 15 MB"


def test_demo_model_notes_images_outside_the_shapes_world(server):
    app, port = server
    assert app.demo and request(port, "GET", "/api/info")[1]["demo"] is True
    for name, noted in (("shapes_3.png", False), ("photo_cat.jpg", True)):
        got, img = request(port, "POST", "/api/image", {"sample": name})
        assert got == 200 and (img["note"] is not None) == noted, img
        if noted:
            assert "knows only the synthetic shapes world" in img["note"]


def test_methods_get_405_with_allow_and_head_is_get_without_a_body(server):
    _, port = server
    for method, path, allow in [("DELETE", "/", "GET, HEAD"), ("PATCH", "/api/info", "GET, HEAD"),
                                ("PUT", "/api/chat", "POST"), ("DELETE", "/api/image", "POST"),
                                ("GET", "/api/chat", "POST"), ("POST", "/", "GET, HEAD")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, body="{}", headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        reply = json.loads(r.read())
        conn.close()
        assert r.status == 405 and r.getheader("Allow") == allow, (method, path, r.status, r.getheader("Allow"))
        assert f"method {method} is not allowed on {path}" in reply["error"], reply
    for path, status, kind in [("/", 200, "text/html"), ("/api/info", 200, "application/json"),
                               ("/nope", 404, "application/json"), ("/api/chat", 405, "application/json")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        full = conn.getresponse().read()
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # http.client never reads a HEAD body
            s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        assert int(head.split()[1]) == status and body == b"" and headers["Content-Type"].startswith(kind), (path, data)
        assert int(headers["Content-Length"]) == len(full) or path != "/", (path, headers)


def test_a_client_that_hangs_up_leaves_no_traceback(server, monkeypatch, capfd):
    """The reply to a request whose client already left (reset) is dropped quietly, the server lives on."""
    app, port = server
    entered, hung_up, answered = threading.Event(), threading.Event(), threading.Event()

    def slow_refusal(req):  # the request is read; the client is gone by the time the server answers
        entered.set()
        assert hung_up.wait(10)
        time.sleep(0.1)  # the reset reaches the server's socket
        answered.set()
        raise web.HTTPError(400, "too late")
    monkeypatch.setattr(app, "add_image", slow_refusal)
    for _ in range(3):
        for event in (entered, hung_up, answered):
            event.clear()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 2\r\n\r\n{}")
        assert entered.wait(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        s.close()
        hung_up.set()
        assert answered.wait(10)
        time.sleep(0.3)  # the handler writes its reply into the reset connection
    monkeypatch.undo()
    s = socket.create_connection(("127.0.0.1", port))  # and one that leaves halfway through its headers
    s.sendall(b"POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.3)
    assert request(port, "GET", "/api/info")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err


def test_page_is_self_contained(server):
    _, port = server
    status, html = request(port, "GET", "/")
    assert status == 200 and "<script>" in html
    assert re.search(r"https?://", html) is None  # nothing fetched from elsewhere: no CDN, no web fonts
    assert "EventSource" not in html and "getReader" in html  # SSE read from a POST with fetch


def test_cli_refuses_missing_weights(capsys):
    assert web.main(["--weights", "/nonexistent/model.pth"]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The page in a real browser: Chromium driven over its DevTools pipe (standard library only).

CHROMIUM = os.environ.get("MINIVLM_CHROMIUM", "/usr/bin/chromium")


class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, binary, profile, size=(1400, 1000)):
        to_chrome, self.w = os.pipe()
        self.r, from_chrome = os.pipe()
        # Chromium reads fd 3 and writes fd 4. A tiny Python exec's it with the pipe ends moved there
        # (no preexec_fn: the server thread is running). fds >= 10 first, so that 3 and 4 are free to take.
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome))
        os.close(to_chrome)
        os.close(from_chrome)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--remote-debugging-pipe"]
        move = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        self.proc = subprocess.Popen([sys.executable, "-c", move, str(a), str(b), binary, *flags, "about:blank"],
                                     pass_fds=(a, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self.buf, self.n, self.session = b"", 0, None

    def call(self, method, timeout=30, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        end = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.n:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.time() > end:
                raise TimeoutError(method)
            if select.select([self.r], [], [], 1)[0]:
                self.buf += os.read(self.r, 1 << 20)

    def evaluate(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.w)
        os.close(self.r)


@pytest.mark.skipif(not os.path.isfile(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (set MINIVLM_CHROMIUM to another "
                    "binary); the page's server is still tested above")
def test_page_in_headless_chromium(server, tmp_path):
    """?demo=1 asks about a sample; the page marks itself done with the tokens it showed. The screenshot goes
    to tmp, or to $MINIVLM_WEB_SCREENSHOT (how minivlm/demo/web.png was made)."""
    app, port = server
    shot = os.environ.get("MINIVLM_WEB_SCREENSHOT") or str(tmp_path / "web.png")
    browser = DevTools(CHROMIUM, tempfile.mkdtemp(dir=tmp_path))
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/?demo=1&sample=shapes_3.png&token=11")
        state = ""
        for _ in range(300):
            state = browser.evaluate("document.getElementById('done') ? document.getElementById('done').dataset.state || '' : ''")
            if state:
                break
            time.sleep(0.2)
        result = json.loads(browser.evaluate("document.getElementById('done').textContent"))
        assert state == "done", result
        time.sleep(0.3)  # let the canvases paint
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    content = user_turn(QUESTION, 1, app.question_first)
    assert result["tokens"] == reference(app, [load_image(SAMPLE)], [{"role": "user", "content": content}])
    image = Image.open(io.BytesIO(png))
    assert image.size == (1400, 1000)
    image.convert("RGB").quantize(256).save(shot, optimize=True)  # a palette PNG: a third of the size


def wait_for(browser, condition: str, seconds: float = 60):
    for _ in range(int(seconds / 0.1)):
        if browser.evaluate(condition):
            return
        time.sleep(0.1)
    raise AssertionError(f"never true: {condition}")


def press(browser, key: str):
    """A real key press (keyDown, keyUp) on the focused element, as a keyboard user makes it."""
    code, vk, text = {"Enter": ("Enter", 13, "\r"), " ": ("Space", 32, " ")}[key]
    browser.call("Input.dispatchKeyEvent", type="keyDown", key=key, code=code, windowsVirtualKeyCode=vk, text=text)
    browser.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)


@pytest.mark.skipif(not os.path.isfile(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (set MINIVLM_CHROMIUM to another "
                    "binary); test_web_page.py checks the same fixes in the page's source")
def test_page_behaviour_in_headless_chromium(server, tmp_path):
    """At 125 % zoom, with a photo: the demo note, a crisp patch grid, tokens in their own case and reachable with
    the keyboard, a new answer and a new chat clearing the old views, upload errors that name every bad file and
    the real limit, and a server that cannot be reached saying how to start it."""
    _, port = server
    bad, big, good = tmp_path / "bad.jpg", tmp_path / "big.jpg", tmp_path / "good.png"
    bad.write_bytes(b"certainly not an image")
    big.write_bytes(bytes(16_000_000))
    good.write_bytes(open(os.path.join(web.SAMPLES_DIR, "shapes_1.png"), "rb").read())
    browser = DevTools(CHROMIUM, tempfile.mkdtemp(dir=tmp_path))
    js = browser.evaluate
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1.25, mobile=False)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/?demo=1&sample=photo_cat.jpg&token=0")
        wait_for(browser, "document.getElementById('done') && document.getElementById('done').dataset.state")
        assert js("$('done').dataset.state") == "done", js("$('done').textContent")

        assert js("!$('note').hidden && $('note').textContent").startswith("Note: the demo model knows only the synthetic")
        heat = js("(() => { const c = document.querySelector('#heat canvas'); return [c.width, c.getBoundingClientRect().width]; })()")
        assert heat[0] == 240 and abs(heat[1] * 1.25 - 240) < 0.01, heat  # one canvas pixel per device pixel
        for ratio in (1.25, 1.1, 1.5):  # a grid drawn on black: every line whole device pixels, none blurred
            browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=ratio, mobile=False)
            grid = browser.call("Runtime.evaluate", awaitPromise=True, returnByValue=True, expression="""(async () => {
                const src = document.createElement('canvas'); src.width = src.height = 96;
                const sc = src.getContext('2d'); sc.fillStyle = '#000'; sc.fillRect(0, 0, 96, 96);
                const c = cropCanvas(192); await drawCrop(c, {crop: src.toDataURL()}, null, 0);
                const W = c.width, row = c.getContext('2d').getImageData(0, Math.floor(W / S.info.grid / 2), W, 1).data;
                return {grid: S.info.grid, dpr: devicePixelRatio, red: Array.from({length: W}, (_, x) => row[4 * x])}; })()""")
            grid = grid["result"]["value"]
            lines = [v for v in grid["red"] if v >= 150]
            blurred = [v for v in grid["red"] if 20 < v < 150]
            width = max(1, round(ratio))
            assert abs(grid["dpr"] - ratio) < 1e-6 and len(grid["red"]) == round(192 * ratio), grid
            assert len(lines) == width * (grid["grid"] - 1) and not blurred, grid

        style = js("[getComputedStyle($('seltok')).textTransform, $('seltok').innerText, $('seltok').textContent]")
        assert style[0] == "none" and style[1] == style[2] and re.search("[a-z]", style[2]), style
        assert js("document.querySelectorAll('#answer button.tok').length") >= 3
        js("document.querySelectorAll('#answer button.tok')[1].focus()")
        press(browser, "Enter")
        assert js("$('seltok').textContent").startswith("#2 ")
        js("document.querySelectorAll('#answer button.tok')[2].focus()")
        press(browser, " ")
        assert js("$('seltok').textContent").startswith("#3 ")

        started = js("$('question').value = 'How many objects are there?'; ask(); "
                     "[$('timing').textContent, $('cbmid').textContent + $('cbmax').textContent, $('answer').children.length]")
        assert "ms" not in started[0] and started[1:] == ["", 0], started  # nothing of the last answer while streaming
        wait_for(browser, "!S.busy && $('timing').textContent.includes('ms')")

        js("$('reset').click()")
        views = js("[$('prompt').textContent, $('answer').querySelectorAll('button').length, $('timing').textContent, "
                   "$('heat').children.length, $('alts').children.length, $('seltok').textContent, $('cbmax').textContent, "
                   "$('log').querySelectorAll('.msg').length, $('note').hidden]")
        assert views == ["(after the first question)", 0, "(after the first answer)", 0, 0, "none", "", 0, True], views

        doc = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=doc, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(bad), str(big), str(good)])
        wait_for(browser, "S.pending.length === 1 && !$('status').textContent.includes('reading')")
        errors = js("$('status').className + '|' + $('status').textContent")
        assert errors == "err|bad.jpg is not an image file this server can read (PNG, JPEG, GIF, BMP, WebP)\n" \
                         "big.jpg is 16.0 MB; the limit is 15 MB", errors

        browser.call("Network.enable")
        browser.call("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1, uploadThroughput=-1)
        browser.call("Runtime.evaluate", expression="$('question').value = 'hello?'; ask()", awaitPromise=True)
        assert re.match(r"the server is not reachable.*python -m minivlm\.web", js("$('status').textContent")), js("$('status').textContent")
    finally:
        browser.close()
