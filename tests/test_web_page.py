"""The web page (`minivlm/web/static/index.html`) read as text: cheap checks that run where no browser is.

The page's behaviour in a real browser is tested in test_web.py (headless Chromium, where installed); these
checks pin the same fixes down in CI: each names the code that makes the page do the right thing.
"""

import os
import re
from html.parser import HTMLParser

from minivlm.web import server as web

PAGE = open(os.path.join(web.STATIC_DIR, "index.html"), encoding="utf-8").read()
SCRIPT = PAGE[PAGE.index("<script>"):PAGE.index("</script>")]
STYLE = PAGE[PAGE.index("<style>"):PAGE.index("</style>")]


def js_function(name: str) -> str:
    """The source of `function name(...) { ... }` (braces matched; the page's strings hold none unbalanced)."""
    m = re.search(rf"(async )?function {name}\(", SCRIPT)
    assert m, f"no function {name} in the page"
    start = SCRIPT.index("{", m.end())
    depth = 0
    for i in range(start, len(SCRIPT)):
        depth += {"{": 1, "}": -1}.get(SCRIPT[i], 0)
        if depth == 0:
            return SCRIPT[m.start():i + 1]
    raise AssertionError(f"function {name} never ends")


def cleared(body: str) -> set[str]:
    """The element ids a function empties or resets: $("x").replaceChildren(...) / .textContent = ..."""
    ids = set(re.findall(r'\$\("(\w+)"\)\.(?:replaceChildren\(|textContent = )', body))
    for group in re.findall(r"for \(const id of \[([^\]]*)\]\) \$\(id\)\.replaceChildren\(\)", body):
        ids |= set(re.findall(r'"(\w+)"', group))
    return ids


def test_new_chat_clears_every_view():
    assert re.search(r'\$\("reset"\)\.onclick = newChat;', SCRIPT)
    body = js_function("newChat")
    views = cleared(body) | (cleared(js_function("clearAnswer")) if "clearAnswer()" in body else set())
    missing = {"prompt", "answer", "timing", "heat", "alts", "seltok", "share", "cbmid", "cbmax"} - views
    assert not missing, f"New chat leaves {missing}"
    assert "S.messages = []" in body and "S.pending = []" in body and "renderLog()" in body


def test_a_new_answer_clears_the_old_timing_and_colour_bar_numbers():
    assert {"timing", "cbmid", "cbmax", "answer", "heat"} <= cleared(js_function("clearAnswer"))
    ask = js_function("ask")
    assert ask.index("clearAnswer()") < ask.index("postStream("), "cleared when the answer starts, not when it ends"


def test_grid_is_drawn_in_device_pixels():
    canvas, draw = js_function("cropCanvas"), js_function("drawCrop")
    assert "devicePixelRatio" in canvas and re.search(r"Math\.round\(css \* dpr\)", canvas)
    assert "Math.round(k * W / g)" in draw and "+ 0.5" not in draw  # whole device pixels, no half-pixel strokes
    assert not re.search(r'el\("canvas", \{className: "crop", width: 384', SCRIPT)  # every crop canvas from cropCanvas


class Ancestors(HTMLParser):
    """The tags around the element with id `target`."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "source", "wbr"}

    def __init__(self, target):
        super().__init__()
        self.target, self.stack, self.found = target, [], None

    def handle_starttag(self, tag, attrs):
        if dict(attrs).get("id") == self.target:
            self.found = list(self.stack)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(tag):]


def test_selected_token_is_not_shown_in_capitals():
    p = Ancestors("seltok")
    p.feed(PAGE)
    assert p.found is not None and "h2" not in p.found, p.found  # h2 { text-transform: uppercase }
    for selector, rule in re.findall(r"([^{}]+)\{([^}]*)\}", STYLE):
        if "uppercase" in rule:
            assert not re.search(r"seltok|\.tok\b|button", selector), selector


def test_answer_tokens_are_buttons():
    body = js_function("addAnswerToken")
    assert 'el("button", {type: "button", className: "tok gen"' in body and "onclick" in body
    assert "focus-visible" in STYLE  # a visible focus ring for the keyboard


def test_upload_limit_comes_from_the_server():
    body = js_function("addFiles")
    assert "max_upload_bytes" in body and "max_upload}" in body and "the limit is" in body
    assert not re.search(r"\b(20|15)\s*\*\s*1024|max_body_bytes|4 / 3", SCRIPT)  # no number of its own


def test_every_bad_files_error_stays_visible():
    body = js_function("addFiles")
    assert "errors.push" in body and 'errors.join("\\n")' in body
    assert "addImage({data: url, name: f.name}, errors)" in body  # the name goes along: errors name the file
    assert "if (!errors) status(\"\")" in js_function("addImage")  # a good file does not wipe the list
    assert "white-space: pre-line" in re.search(r"#status \{[^}]*\}", STYLE).group(0)


def test_an_unreachable_server_is_explained():
    assert re.search(r"NOT_REACHABLE = \"the server is not reachable.*python -m minivlm\.web", SCRIPT)
    assert SCRIPT.count("fetch(") == 2  # the comment and reach(): every request goes through reach()
    assert "reach(" in js_function("api") and "reach(" in js_function("postStream")


def test_demo_note_is_shown():
    assert 'id="note"' in PAGE
    assert re.search(r"S\.images\[id\]\.note", js_function("renderCrops"))
