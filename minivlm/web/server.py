"""Watch the model look: a local web page that chats about images and shows what the model does.

    python -m minivlm.web [--weights W.pth] [--vision CLIP_DIR] [--tokenizer T.json] [--port 8000]

Python's standard library serves one static page (`static/index.html`, plain JavaScript, nothing
fetched from the internet) and a small JSON API:

    GET  /                 the page (HEAD works wherever GET does; other methods get 405 and an Allow header)
    GET  /api/info         the model's shape (image size, patch grid, layers), the samples, the limits (the
                           upload limit the page checks files against: max_upload_bytes)
    POST /api/image        {"sample": name} or {"data": base64 / data URL, "name": file name} -> an id, the
                           crop the model gets, the original size, a note when the demo model meets a non-shapes image
    POST /api/chat         {"messages": [...], "sampling": {...}} -> server-sent events, read with fetch():
                           prompt (the ids, image runs as blocks), token (one per new token: probability,
                           top-5, attention onto the image patches), done (timings), error
    POST /api/stop         ends the running generation after the current token

The conversation lives in the page and is sent whole with every question, so the history really goes
back to the model, through the one prompt path (`prompt.user_turn` -> `generate.encode_batch`).
`watch.watch` is the decoding loop of `generate.py` once more, recording what a learner wants to see.

Safe by default: it binds 127.0.0.1, bodies and images are size-limited, one generation runs at a time
(a second one gets 429), only the page itself is served, and a bad request gets a JSON error (the checks
live in `validate.py`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import threading
import traceback
import warnings
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageOps, UnidentifiedImageError

from ..common import UserError
from ..model.checkpoint import load_with_tokenizer
from ..infer.cli import DEMO_WEIGHTS, SAMPLES_DIR, add_preset_flag, check_preset, demo_note
from ..infer.generate import SamplingConfig, encode_batch
from ..data.processing import as_transform, to_rgb
from ..data.prompt import IMAGE_MARKER, PromptError, user_turn
from .validate import (MAX_BODY_BYTES, MAX_NEW_TOKENS, MAX_UPLOAD_BYTES, HTTPError, megabytes, parse_body,
                       parse_sampling, shown, upload_bytes)
from .watch import prompt_pieces, watch

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = {"/": "index.html", "/index.html": "index.html"}  # the only files served, by exact path
# Every path the server answers, and the methods it takes there (anything else: 405 with this list).
ROUTES = {**{path: ("GET", "HEAD") for path in STATIC}, "/api/info": ("GET", "HEAD"),
          "/api/image": ("POST",), "/api/chat": ("POST",), "/api/stop": ("POST",)}
STATIC_DIR = os.path.join(HERE, "static")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

MAX_IMAGE_PIXELS = 20_000_000  # 20 MP, checked on the header before any pixel is decoded
MAX_IMAGES = 8  # images in one conversation
MAX_TEXT_CHARS = 4000  # characters in one message
MAX_MESSAGES = 64  # messages in one conversation
KEPT_IMAGES = 64  # uploaded crops the server remembers (oldest forgotten first)


# ---------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, size, name: str = "the image") -> tuple[Image.Image, tuple[int, int]]:
    """Bytes of an image file -> (the size x size RGB image the model receives (CLIP: resize, centre crop;
    SigLIP: squashed to a square, when `size` is such an ImageTransform; the mean/std come later), the
    original's width and height). The header's pixel count is checked before
    decoding (MAX_IMAGE_PIXELS), and Pillow's own decompression-bomb limit is an error too, not a warning.
    Errors name the file by `name`: Pillow would name it by the repr of its BytesIO."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise HTTPError(413, f"{name}: image of {im.width} x {im.height} = {im.width * im.height:,} pixels is "
                                         f"more than MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}")
                im.load()
                image = to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise HTTPError(413, f"{name}: image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise HTTPError(400, f"{name} is not an image file this server can read (PNG, JPEG, GIF, BMP, WebP)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise HTTPError(400, f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    # prep(crop) == prep(original): resizing an image of the target size is a no-op.
    return as_transform(size).resize(image), image.size


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def list_samples(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


class App:
    """The model, its tokenizer and what the server remembers between requests."""

    def __init__(self, model, tokenizer, question_first: bool, name: str = "model", samples_dir: str = SAMPLES_DIR,
                 demo: bool = False):
        self.model, self.tokenizer, self.question_first, self.name = model.eval(), tokenizer, question_first, name
        self.demo = demo  # the shipped demo model: it knows the shapes world only, and the page says so
        self.samples_dir, self.samples = samples_dir, list_samples(samples_dir)
        self.image_size = model.vlm_config.vision.image_size
        self.prep = model.vlm_config.image_transform  # CLIP's crop or SigLIP's squash
        self.images: OrderedDict[str, Image.Image] = OrderedDict()  # id -> crop
        self.images_lock = threading.Lock()
        self.generating = threading.Lock()  # one generation at a time
        self.stop = threading.Event()

    def info(self) -> dict:
        v, lm = self.model.vlm_config.vision, self.model.config
        return {"model": self.name, "image_size": v.image_size, "patch_size": v.patch_size,
                "grid": v.image_size // v.patch_size, "run_length": self.model.run_length,
                "cls": v.select_feature == "cls_patch", "layers": lm.num_hidden_layers,
                "heads": lm.num_attention_heads, "vocab_size": self.tokenizer.vocab_size,
                "question_first": self.question_first, "samples": self.samples, "demo": self.demo,
                "limits": {"max_body_bytes": MAX_BODY_BYTES, "max_upload_bytes": MAX_UPLOAD_BYTES,
                           "max_upload": megabytes(MAX_UPLOAD_BYTES), "max_image_pixels": MAX_IMAGE_PIXELS,
                           "max_new_tokens": MAX_NEW_TOKENS, "max_images": MAX_IMAGES,
                           "max_text_chars": MAX_TEXT_CHARS}}

    def add_image(self, req: dict) -> dict:
        """{"sample": name} or {"data": base64 or data URL, "name": ...} -> {"id", "name", "crop", "size", "note"}."""
        if "sample" in req:
            name = req["sample"]
            if name not in self.samples:  # exact names only: no path ever reaches the file system
                raise HTTPError(400, f"unknown sample {shown(name)}; samples: {', '.join(self.samples)}")
            with open(os.path.join(self.samples_dir, name), "rb") as f:
                data = f.read()
        elif isinstance(req.get("data"), str):
            # The page sends the file's name, so that every error about the file can name it.
            name = req["name"][:100] if isinstance(req.get("name"), str) and req["name"] else "the uploaded file"
            data = upload_bytes(req["data"], name)
        else:
            raise HTTPError(400, 'send {"sample": name} or {"data": base64 image file, "name": file name}')
        crop, size = decode_image(data, self.prep, name)
        # About anything but a shapes scene the demo can only speak the language of shapes: not a bug.
        note = demo_note([size]) if self.demo else None
        key = hashlib.sha256(crop.tobytes()).hexdigest()[:16]
        with self.images_lock:
            self.images[key] = crop
            self.images.move_to_end(key)
            while len(self.images) > KEPT_IMAGES:
                self.images.popitem(last=False)
        return {"id": key, "name": name, "crop": png_data_url(crop), "image_size": self.image_size,
                "size": list(size), "note": note}

    def parse_chat(self, req: dict):
        """{"messages": [{"role", "text", "images": [ids]}, ...], "sampling"} -> (batch, cfg)."""
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not 1 <= len(msgs) <= MAX_MESSAGES:
            raise HTTPError(400, f"messages must be a list of 1 to {MAX_MESSAGES} messages")
        images, messages = [], []
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if not isinstance(m, dict) or m.get("role") != want:
                raise HTTPError(400, f"messages[{i}] must be an object with role {want!r} (user and assistant alternate)")
            text, ids = m.get("text"), m.get("images", [])
            if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
                raise HTTPError(400, f"messages[{i}].text must be a string of at most {MAX_TEXT_CHARS} characters")
            if not isinstance(ids, list) or (ids and want == "assistant"):
                raise HTTPError(400, f"messages[{i}].images must be a list of image ids, in user messages only")
            with self.images_lock:
                missing = [k for k in ids if not isinstance(k, str) or k not in self.images]
                images += [self.images[k] for k in ids if not missing]
            if missing:
                raise HTTPError(400, f"unknown image id {shown(missing[0])}: upload the image again")
            if want == "assistant" and IMAGE_MARKER in text:
                raise HTTPError(400, f"messages[{i}]: an answer cannot hold {IMAGE_MARKER}; start a new chat")
            try:
                content = user_turn(text, len(ids), self.question_first) if want == "user" else text
            except PromptError as e:
                raise HTTPError(400, f"messages[{i}]: {e}") from None
            messages.append({"role": want, "content": content})
        if messages[-1]["role"] != "user":
            raise HTTPError(400, "the last message must be the user's question")
        if len(images) > MAX_IMAGES:
            raise HTTPError(400, f"{len(images)} images in one conversation; at most MAX_IMAGES = {MAX_IMAGES}")
        cfg = parse_sampling(req.get("sampling"), self.tokenizer.vocab_size)
        batch = encode_batch(self.model, self.tokenizer, [(images, messages)], self.prep)
        n, room = batch["input_ids"].shape[1], self.model.config.max_position_embeddings
        if n >= room:
            raise HTTPError(400, f"the conversation is {n} tokens, the model reads at most {room}: start a new chat")
        return batch, cfg

    def events(self, batch: dict, cfg: SamplingConfig):
        """Yield (event, data) for one generation: prompt, then token per new token, then done."""
        tok, model = self.tokenizer, self.model
        ids = batch["input_ids"][0].tolist()
        yield "prompt", {"pieces": prompt_pieces(tok, ids, model.placeholder_id, model.run_length),
                         "n_tokens": len(ids), "n_images": int(batch["image_counts"][0]) if
                         batch["image_counts"] is not None else 0}
        answer, times, reason = [], [], "max_new_tokens"
        for rec in watch(model, batch, cfg, tok.eos_id):
            times.append(rec["ms"])
            if rec["id"] != tok.eos_id:
                answer.append(rec["id"])
            attn = rec["attn"]
            yield "token", {"i": len(times) - 1, "id": rec["id"], "eos": rec["id"] == tok.eos_id,
                            "piece": tok.decode([rec["id"]], skip_special_tokens=False),
                            "text": tok.decode(answer), "p": round(rec["p"], 5), "ms": round(rec["ms"], 2),
                            "top": [[tok.decode([i], skip_special_tokens=False), round(p, 5)] for i, p in rec["top"]],
                            "image_share": [round(x, 4) for x in attn.sum(-1).tolist()],
                            "attn": [[round(x, 5) for x in row] for row in attn.tolist()]}
            if rec["id"] == tok.eos_id:
                reason = "eos"
            elif self.stop.is_set():
                reason = "stopped"
                break
        if reason == "max_new_tokens" and len(times) < cfg.max_new_tokens:
            reason = "context_full"  # the model's max_position_embeddings ended it
        decode = times[1:]
        yield "done", {"reason": reason, "tokens": len(times), "text": tok.decode(answer),
                       "prefill_ms": round(times[0], 2) if times else 0.0, "decode_ms": round(sum(decode), 2),
                       "ms_per_token": round(sum(decode) / len(decode), 2) if decode else None,
                       "tokens_per_s": round(1000 * len(decode) / sum(decode), 1) if decode else None}


# ---------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """One request. `server.app` is the App; every failure becomes a JSON error, never a dead server."""

    server_version = "minivlm-web"
    timeout = 60  # seconds a client may stall while sending its request

    def log_message(self, fmt, *args):
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):  # the client left while its request was being read
            self.close_connection = True

    def send_body(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        """A whole response; a HEAD request gets the same headers and no body. A client that hung up before
        its answer is simply gone: nothing to tell it, and no traceback to print."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_json(self, status: int, obj: dict, headers: dict | None = None):
        self.send_body(status, json.dumps(obj).encode(), "application/json", {"Cache-Control": "no-store", **(headers or {})})

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, f"bad Content-Length {length[:40]!r}") from None
        if n > MAX_BODY_BYTES or n < 0:
            raise HTTPError(413, f"request body of {n:,} bytes is more than MAX_BODY_BYTES = {MAX_BODY_BYTES:,}")
        return parse_body(self.rfile.read(n))

    def handle_errors(self, route):
        try:
            route()
        except HTTPError as e:
            self.close_connection = True  # a body may be left unread: the next request cannot start after it
            self.send_json(e.status, {"error": str(e)}, e.headers)
        except OSError:
            pass  # the client went away or stalled past `timeout`
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc()
            self.send_json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def send_error(self, code, message=None, explain=None):
        """What http.server itself refuses (a malformed request line, an unknown method) is JSON too."""
        self.close_connection = True
        self.send_json(code, {"error": message or self.responses.get(code, ("bad request",))[0]})

    def check_origin(self):
        """Bound to loopback, answer only requests addressed to loopback (a DNS-rebinding page is not)."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.server.loopback and host not in ("127.0.0.1", "localhost", "::1"):
            raise HTTPError(403, f"this server answers requests to 127.0.0.1 / localhost only, not {host[:100]!r}")

    def route(self):
        """Every method http.server knows comes here: the path picks the route, the route lists its methods."""
        self.check_origin()
        path = self.path.split("?", 1)[0]
        if path not in ROUTES:  # a fixed list of exact paths: "/../x" or "/%2e%2e/x" is simply not on it
            raise HTTPError(404, f"not found: {path[:200]}")
        allowed = ROUTES[path]
        if self.command not in allowed:
            raise HTTPError(405, f"method {self.command} is not allowed on {path}; use {' or '.join(allowed)}",
                            {"Allow": ", ".join(allowed)})
        if self.command == "POST":
            # JSON only: a cross-site page cannot send that without a CORS preflight, which it never gets.
            if self.headers.get_content_type() != "application/json":
                raise HTTPError(415, "POST bodies must be JSON (Content-Type: application/json)")
            return self.post(path)
        return self.get(path)  # HEAD too: send_body leaves the body out

    def do_GET(self):
        self.handle_errors(self.route)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def get(self, path: str):
        if path == "/api/info":
            return self.send_json(200, self.server.app.info())
        with open(os.path.join(STATIC_DIR, STATIC[path]), "rb") as f:
            body = f.read()
        self.send_body(200, body, "text/html; charset=utf-8",
                       {"Content-Security-Policy": "default-src 'self' 'unsafe-inline' data:"})

    def post(self, path: str):
        app = self.server.app
        routes = {"/api/image": lambda: self.send_json(200, app.add_image(self.read_json())),
                  "/api/chat": self.chat,
                  "/api/stop": lambda: (app.stop.set(), self.send_json(200, {"stopping": app.generating.locked()}))}
        routes[path]()

    def send_event(self, event: str, data: dict):
        self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def chat(self):
        app = self.server.app
        batch, cfg = app.parse_chat(self.read_json())  # every 400 comes before the stream starts
        if not app.generating.acquire(blocking=False):
            raise HTTPError(429, "busy: another answer is being generated; wait for it or stop it, then ask again")
        try:
            app.stop.clear()
            self.close_connection = True  # the stream ends when the connection closes
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                for event, data in app.events(batch, cfg):
                    self.send_event(event, data)
            except OSError:
                return  # the page went away, was reloaded or stopped reading: stop generating
            except Exception as e:  # headers are sent: report the failure inside the stream
                traceback.print_exc()
                try:
                    self.send_event("error", {"error": f"{type(e).__name__}: {e}"})
                except OSError:
                    pass  # and the page is gone as well
        finally:
            app.generating.release()


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> ThreadingHTTPServer:
    """A ready server (port 0 = any free port: read it back from server.server_address)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app, server.verbose = app, verbose
    server.loopback = host in ("127.0.0.1", "localhost", "::1")
    return server


def load_app(weights: str = DEMO_WEIGHTS, vision: str | None = None, tokenizer: str | None = None,
             device: str = "cpu", preset: str | None = None) -> App:
    """The model (with its question order from the checkpoint JSON) and its tokenizer, as an App."""
    model, tok, question_first = load_with_tokenizer(weights, tokenizer, vision)
    check_preset(model, preset, weights)
    return App(model.to(device), tok, question_first, name=os.path.basename(weights),
               demo=os.path.abspath(weights) == os.path.abspath(DEMO_WEIGHTS))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minivlm.web", description="A local web page to chat with a VLM "
                                "about images and watch it look: tokens, probabilities, attention on the patches.")
    p.add_argument("--weights", default=DEMO_WEIGHTS, help="checkpoint (default: the shipped demo model)")
    p.add_argument("--vision", default=None, help="Hugging Face CLIP folder, or SigLIP2 for a minimind-3v checkpoint "
                                                  "(default: saved with the checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside --weights)")
    add_preset_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the page to your network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, …")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if not os.path.isfile(args.weights):
        print(f"error: {args.weights}: weights file not found", file=sys.stderr)
        return 2
    try:
        app = load_app(args.weights, args.vision, args.tokenizer, args.device, args.preset)
        server = make_server(app, args.host, args.port, args.verbose)
    except (OSError, ValueError, UserError) as e:  # WeightsError is a ValueError; so is a bad tokenizer
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"minivlm: {app.name} on http://{args.host}:{server.server_address[1]}/  (Ctrl-C stops)")
    if not server.loopback:
        print(f"warning: bound to {args.host}: anyone who can reach this machine can use the page")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
