"""Images as prompts on a tiny synthetic decoder and tower: image vectors reach the decoder, cached
and batched generation agree with the naive path, runs round-trip with their preprocessing,
training overfits a handful of pairs and resumes exactly, and bad input fails cleanly."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmforge.api import LM
from lmforge.config import VisionConfig
from lmforge.engine.vision import image_prompt
from lmforge.errors import LMForgeError
from lmforge.images import decode_data_uri, load_image, question_ids
from lmforge.models.vision import IMAGE, build_tower, splice
from lmforge.vqa import CAPTION_QUESTION
from lmforge.weights.checkpoint import save_checkpoint
from lmforge.weights.vision import load_vision, save_vision

from conftest import tiny_chat_lm
from test_cli import run_cli

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "black": (0, 0, 0)}
SHAPES = ("circle", "square")


def draw(color: str, shape: str, size: int = 32) -> Image.Image:
    from PIL import ImageDraw

    im = Image.new("RGB", (size, size), (250, 245, 240))
    d = ImageDraw.Draw(im)
    box = (6, 6, size - 6, size - 6)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    return im


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """The tiny chat decoder saved as an lmforge checkpoint (a vision run names it by path)."""
    lm = tiny_chat_lm()
    path = tmp_path_factory.mktemp("decoder") / "ckpt"
    save_checkpoint(path, lm.model, step=0, tokenizer_json=lm.tokenizer.to_str(), train_config=None,
                    meta={"tokenizer": "bpe"}, tokenizer_extra=lm.tokenizer.saved_extra())
    return path


@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory):
    """8 image-question pairs in the folder format (train.jsonl and test.jsonl)."""
    d = tmp_path_factory.mktemp("vqa")
    rows = []
    for k, (color, shape) in enumerate([(c, s) for c in COLORS for s in SHAPES]):
        draw(color, shape).save(d / f"{k}.png")
        rows.append({"image": f"{k}.png", "question": "what color is the shape?", "answer": color, "type": "color"})
    for name in ("train.jsonl", "test.jsonl"):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return d


def tower_for(lm: LM, seed: int = 0):
    torch.manual_seed(seed)
    return build_tower(VisionConfig(image_size=32, channels=(8, 16), shuffle=2, lm_embd=lm.config.n_embd),
                       embed_std=0.3)


def pixels(*specs) -> torch.Tensor:
    return torch.stack([load_image(_png(draw(c, s)), 32) for c, s in specs])


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_splice_places_each_image_between_its_markers():
    tok = torch.arange(5 * 4, dtype=torch.float32).view(5, 4)
    ids = torch.tensor([7, IMAGE, 8, IMAGE, 9])
    imgs = torch.full((2, 3, 4), -1.0)
    imgs[1] = -2.0
    out, starts = splice(tok, ids, imgs)
    assert out.shape == (3 + 2 * 3, 4) and starts == [1, 5]
    assert torch.equal(out[0], tok[0]) and torch.equal(out[4], tok[2]) and torch.equal(out[8], tok[4])
    assert (out[1:4] == -1).all() and (out[5:8] == -2).all()
    with pytest.raises(ValueError, match="placeholder"):
        splice(tok, ids, imgs[:1])


def test_image_tokens_reach_the_decoder():
    lm = tiny_chat_lm()
    lm.vision, lm.vision_chat = tower_for(lm), True
    ids = question_ids(lm.tokenizer, "what color is the shape?", chat=True)
    assert ids.count(IMAGE) == 1
    runs = {}
    for name, spec in (("red", ("red", "circle")), ("blue", ("blue", "square"))):
        emb, _ = image_prompt(lm.model, lm.vision, ids, pixels(spec))
        with torch.no_grad():
            runs[name] = lm.model(input_embeds=emb[None])[0][0, -1]
    assert not torch.allclose(runs["red"], runs["blue"], atol=1e-4)  # the image changes the next-token logits
    # the text-only positions are the decoder's own token embeddings
    emb, rows = image_prompt(lm.model, lm.vision, ids, pixels(("red", "circle")))
    k, n = ids.index(IMAGE), lm.vision.config.n_tokens + 2
    assert emb.shape[0] == len(rows) == len(ids) - 1 + n  # one id per row: the image's rows marked IMAGE
    assert rows[:k] == ids[:k] and rows[k:k + n] == [IMAGE] * n and rows[k + n:] == ids[k + 1:]
    assert torch.allclose(emb[:k], lm.model.embed(torch.tensor(ids[:k])).float())


def test_cached_and_batched_generation_equal_the_naive_path():
    lm = tiny_chat_lm()
    lm.vision, lm.vision_chat = tower_for(lm), True
    specs = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("black", "square")]
    solo = []
    for spec in specs:
        ids = question_ids(lm.tokenizer, "describe it", chat=True)
        emb, _ = image_prompt(lm.model, lm.vision, ids, pixels(spec))
        seq, naive = emb[None], []
        with torch.no_grad():  # no cache: the whole sequence again for every token
            for _ in range(12):
                nxt = int(lm.model(input_embeds=seq)[0][0, -1].argmax())
                naive.append(nxt)
                seq = torch.cat([seq, lm.model.embed(torch.tensor([[nxt]])).float()], 1)
        ev = list(lm.events("describe it", max_new_tokens=12, temperature=0.0, images=[pixels(spec)[0]]))
        got = [e.token for e in ev if e.token is not None]
        assert got == naive[:len(got)] and (len(got) == 12 or got[-1] in lm.tokenizer.stop_ids)
        solo.append(got)
    # the four at once through the engine (one decode forward per step for all of them)
    reqs = [lm.request(question_ids(lm.tokenizer, "describe it", chat=True), 12, temperature=0.0,
                       images=[pixels(s)[0]]) for s in specs]
    out: dict[int, list[int]] = {}
    for e in lm.engine.run(reqs):
        if e.token is not None:
            out.setdefault(e.request_id, []).append(e.token)
    assert [out[r.id] for r in reqs] == solo
    assert len({tuple(s) for s in solo}) > 1  # different images, different replies


def test_a_run_round_trips_with_its_preprocessing(tmp_path, decoder):
    lm = LM.load(decoder, quantize="none")
    tower = tower_for(lm, seed=3)
    save_vision(tmp_path, tower.eval(), str(decoder), chat=True)
    meta = json.loads((tmp_path / "vision.json").read_text())
    assert meta["vision"]["image_size"] == 32 and meta["vision"]["mean"] == [0.5, 0.5, 0.5]
    loaded, _ = load_vision(tmp_path)
    px = pixels(("red", "circle"), ("blue", "square"))
    want = tower.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items()) and loaded.state_dict().keys() == want.keys()
    with torch.no_grad():  # loaded for inference in channels-last layout: the same sums, in another order
        torch.testing.assert_close(loaded(px), tower(px), atol=1e-5, rtol=1e-5)
    run = LM.load(tmp_path, quantize="none")  # the decoder it names, plus the tower
    assert run.vision is not None and run.vision_chat
    # the text before the image was computed at load: the first question reuses it from the cache
    first = list(run.events("what color?", max_new_tokens=2, temperature=0.0, images=[px[0]]))
    head = question_ids(run.tokenizer, "what color?", chat=True).index(IMAGE)
    assert head > 5 and first[-1].usage.cached_tokens == head
    a = run.generate("what color?", max_new_tokens=6, temperature=0.0, images=[px[0]])
    b = run.generate("what color?", max_new_tokens=6, temperature=0.0, images=[_png(draw("red", "circle"))])
    assert a == b  # a tensor and the same image's PNG bytes, preprocessed alike
    # a damaged weights file is one clear error
    (tmp_path / "vision.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(LMForgeError, match="corrupt"):
        LM.load(tmp_path)


def test_a_run_with_adapters_loads_them_folded_into_the_decoder(tmp_path, decoder):
    from lmforge.models.lora import adapter_state, add_lora
    from lmforge.train.vision import LORA_TARGETS

    lm = LM.load(decoder, quantize="none")
    ids = torch.tensor([lm.tokenizer.encode("what color is it?", check=False)])
    with torch.no_grad():
        plain = lm.model(ids)[0]
    assert add_lora(lm.model, 2, 4.0, LORA_TARGETS) > 0
    torch.manual_seed(0)
    for n, p in lm.model.named_parameters():
        if n.endswith("lora_b"):  # as if trained: B starts at zero
            p.data.normal_(0, 0.3)
    with torch.no_grad():
        live = lm.model(ids)[0]
    assert not torch.allclose(live, plain, atol=1e-3)
    save_vision(tmp_path, tower_for(lm).eval(), str(decoder), chat=True, adapters=adapter_state(lm.model),
                lora={"rank": 2, "alpha": 4.0, "targets": list(LORA_TARGETS)})
    with torch.no_grad():
        folded = LM.load(tmp_path, quantize="none").model(ids)[0]
        for scheme in ("int8", "int4"):  # each quantized layer rebuilt as int8 from its weight plus the update
            q = LM.load(tmp_path, quantize=scheme)
            assert q.quantized == scheme and type(q.model.blocks[0].attn.qkv_proj).__name__ == "Int8Linear"
            err = (q.model(ids)[0] - live).abs().max()
            assert err < (q.model(ids)[0] - plain).abs().max(), scheme  # nearer the adapted model than the plain one
            assert scheme == "int4" or err < 0.1 * live.abs().max()  # (4 bits of random tiny weights are coarse)
    assert torch.allclose(folded, live, atol=1e-4)
    (tmp_path / "decoder_lora.safetensors").write_bytes(b"\0" * 50)
    with pytest.raises(LMForgeError, match="corrupt"):
        LM.load(tmp_path)


def test_training_overfits_eight_pairs_and_resumes_exactly(tmp_path, decoder, vqa_folder):
    from lmforge.tasks import vision

    common = dict(steps=200, batch_size=8, lr=1e-2, eval_every=100, progress=False, log=lambda m: None)
    rep = vision.finetune(str(decoder), tmp_path / "full", vqa_folder, **common)
    assert rep["steps"] == 200
    res = vision.evaluate(tmp_path / "full", vqa_folder, quantize="none")
    assert res["questions"] == 8 and res["accuracy"]["all"] >= 7 / 8, res  # chance is 1/4
    metrics = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert losses[-1] < 0.2 * losses[0]
    # killed after 130 steps (the checkpoint of step 100 stays), then resumed: the same weights
    part = vision.finetune(str(decoder), tmp_path / "part", vqa_folder, stop_after=130, **common)
    assert part["stopped_at"] == 130
    vision.finetune(str(decoder), tmp_path / "part", vqa_folder, resume=True, **common)
    from safetensors.torch import load_file

    for name in ("vision.safetensors", "decoder_lora.safetensors"):  # the tower, and the decoder's adapters
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_cli_generate_and_eval_vqa(tmp_path, decoder, vqa_folder, capsys):
    lm = LM.load(decoder, quantize="none")
    save_vision(tmp_path, tower_for(lm).eval(), str(decoder), chat=True)
    img = vqa_folder / "0.png"
    code, out, err = run_cli(["generate", tmp_path, "what color is the shape?", "--image", img, "--max-tokens", "5",
                              "--temperature", "0", "--quantize", "none"], capsys)
    assert code == 0, err
    want = LM.load(tmp_path, quantize="none").generate("what color is the shape?", max_new_tokens=5,
                                                       temperature=0.0, images=[img])
    assert out == want + "\n"
    code, out, err = run_cli(["eval", "vqa", tmp_path, "--data", vqa_folder, "--quantize", "none"], capsys)
    assert code == 0 and "8 questions on 8 images" in out and "color" in out, err


def test_bad_images_and_requests(tmp_path, decoder, capsys):
    lm = LM.load(decoder, quantize="none")
    (tmp_path / "run").mkdir()
    save_vision(tmp_path / "run", tower_for(lm).eval(), str(decoder), chat=True)
    (tmp_path / "notes.txt").write_text("not an image")
    good = _png(draw("red", "circle"))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")  # 48 M pixels, a small file
    cases = {
        "notes.txt": "not an image",
        "cut.png": "truncated or corrupt",
        "huge.png": "over the limit",
        "missing.png": "no such image file",
    }
    for name, msg in cases.items():
        code, _, err = run_cli(["generate", tmp_path / "run", "what?", "--image", tmp_path / name], capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (name, err)
    (tmp_path / "ok.png").write_bytes(good)
    code, _, err = run_cli(["generate", decoder, "what?", "--image", tmp_path / "ok.png"], capsys)
    assert code == 1 and "takes no images" in err
    run = LM.load(tmp_path / "run", quantize="none")
    with pytest.raises(LMForgeError, match="context"):
        run.generate("what?", images=[good] * 40, max_new_tokens=2)  # 40 x 18 positions > 512
    with pytest.raises(LMForgeError, match="not fetched"):
        decode_data_uri("https://example.com/cat.png")
    with pytest.raises(LMForgeError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@")
    assert decode_data_uri("data:image/png;base64," + base64.b64encode(good).decode()) == good


def test_server_takes_data_uri_images_and_refuses_urls():
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from conftest import LiveServer

    from lmforge.server.service import Service

    lm = tiny_chat_lm()
    lm.vision, lm.vision_chat = tower_for(lm), True
    text = tiny_chat_lm()  # a text-only model beside it
    srv = LiveServer(Service({"see": lm, "text": text}))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        replies = {}
        for color in ("red", "blue"):
            uri = "data:image/png;base64," + base64.b64encode(_png(draw(color, "circle"))).decode()
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                 {"type": "text", "text": "what color is it?"}]}]
            r = client.chat.completions.create(model="see", messages=msgs, max_tokens=8, temperature=0)
            want = "".join(lm.chat([{"role": "user", "content": "<image>what color is it?"}], max_new_tokens=8,
                                   temperature=0.0, images=[_png(draw(color, "circle"))]))
            replies[color] = r.choices[0].message.content
            assert replies[color] == want
        assert replies["red"] != replies["blue"]
        url_msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                                                {"type": "text", "text": "what is it?"}]}]
        with pytest.raises(openai.BadRequestError, match="not fetched"):
            client.chat.completions.create(model="see", messages=url_msg, max_tokens=4)
        ok = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(_png(draw("red", "square"))).decode()}}]}]
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            client.chat.completions.create(model="text", messages=ok, max_tokens=4)
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]
        with pytest.raises(openai.BadRequestError, match="not an image"):
            client.chat.completions.create(model="see", messages=bad, max_tokens=4)
    finally:
        srv.close()


def test_attention_map_picture(tmp_path, decoder, capsys):
    lm = LM.load(decoder, quantize="none")
    save_vision(tmp_path, tower_for(lm).eval(), str(decoder), chat=True)
    (tmp_path / "red.png").write_bytes(_png(draw("red", "circle")))
    from lmforge.tasks.vision import attention_map

    run = LM.load(tmp_path, quantize="none")
    res = attention_map(run, tmp_path / "red.png", "what color?", tmp_path / "att.png", max_new_tokens=4)
    want = run.generate("what color?", max_new_tokens=4, temperature=0.0, images=[tmp_path / "red.png"])
    assert res["answer"] == want
    side = run.vision.config.grid // run.vision.config.shuffle
    for t in res["tokens"]:
        w = torch.tensor(t["weights"])
        assert w.shape == (side, side) and (w >= 0).all() and 0 < t["image_share"] <= 1
        assert abs(float(w.sum()) - t["image_share"]) < 1e-5
    assert (tmp_path / "att.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli(["generate", tmp_path, "what color?", "--image", tmp_path / "red.png", "--attention-map",
                              tmp_path / "cli.png", "--max-tokens", "4", "--quantize", "none"], capsys)
    assert code == 0 and (tmp_path / "cli.png").is_file() and "on the image" in err, err
    code, _, err = run_cli(["generate", tmp_path, "what?", "--attention-map", tmp_path / "x.png"], capsys)
    assert code == 1 and "exactly one --image" in err


def test_the_text_before_an_image_is_reused_from_the_cache():
    lm = tiny_chat_lm()
    lm.vision, lm.vision_chat = tower_for(lm), True
    ids = question_ids(lm.tokenizer, "what color is the shape?", chat=True)
    before = ids.index(IMAGE)
    runs = []
    for spec in (("red", "circle"), ("blue", "square"), ("red", "circle")):
        ev = list(lm.events("what color is the shape?", 6, temperature=0.0, images=[pixels(spec)[0]]))
        runs.append(([e.token for e in ev if e.token is not None], ev[-1].usage.cached_tokens))
    assert runs[0][1] == 0 and runs[1][1] == runs[2][1] == before  # the same image is not assumed the same
    assert runs[2][0] == runs[0][0] and runs[1][0] != runs[0][0]


def test_the_encoder_warm_up_learns_caption_words():
    from lmforge.train.vision import warm_up_encoder
    from lmforge.vqa import VQAData

    specs = [(c, s) for c in COLORS for s in SHAPES]
    data = VQAData(pixels(*specs), [(k, "Describe the image.", f"a {c} {s}", "caption") for k, (c, s) in enumerate(specs)])
    torch.manual_seed(0)
    tower = build_tower(VisionConfig(image_size=32, channels=(8, 16), lm_embd=32))
    before = {k: v.clone() for k, v in tower.encoder.state_dict().items()}
    first = warm_up_encoder(tower, data, data.rows, 1, 0, log=lambda m: None)
    last = warm_up_encoder(tower, data, data.rows, 300, 0, log=lambda m: None)
    assert last < 0.1 < first  # "a" is in every caption; colour and shape words are told apart
    assert any(not torch.equal(before[k], v) for k, v in tower.encoder.state_dict().items())
    assert warm_up_encoder(tower, VQAData(data.images, []), [], 300, 0) is None  # no captions: nothing to do


@pytest.mark.parametrize("window", [None, 6])
def test_packed_questions_learn_exactly_what_lone_prompts_teach(window):
    """Several questions about one image in one sequence (shared start and image, each question
    seeing only itself past them, at its lone positions): the same loss per reply token and the
    same gradients as each question in a sequence of its own; also with sliding-window layers."""
    import dataclasses

    from lmforge.models import build_model
    from lmforge.train.vision import VisionTask, VisionTrainConfig
    from lmforge.vqa import VQAData

    lm = tiny_chat_lm()
    if window:  # the same weights in a model whose first layer sees only 6 tokens back
        cfg = dataclasses.replace(lm.model.config, sliding_window=window, global_every=2)
        model = build_model(cfg)
        model.load_state_dict(lm.model.state_dict())
        lm.model = model
    lm.model.eval().requires_grad_(False)
    tower = tower_for(lm)
    qs = [("what color is the shape?", "red"), ("is there a circle?", "yes"), ("is it blue?", "no"),
          ("what shape does the image contain, if any?", "circle")]
    rows = [(0, q, a, "x") for q, a in qs] + [(1, "what color?", "blue", "x")]
    data = VQAData(images=pixels(("red", "circle"), ("blue", "square")), rows=rows)
    task = VisionTask(lm.model, lm.tokenizer, tower, None, VisionTrainConfig(align_frac=0), data, rows, [], True, None)

    def run(groups):
        tower.zero_grad()
        loss = task.loss(lm.model, ("questions", groups))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()}

    packed, g_packed = run([rows[:4], rows[4:]])
    n_reply = [len(task._ids(q, a)[1]) for _, q, a, _ in rows]
    total, g_total = 0.0, None
    for r, n in zip(rows, n_reply):  # each alone, weighted by its reply tokens as the mean over all of them is
        loss, g = run([[r]])
        total += loss * n
        g_total = {k: v * n for k, v in g.items()} if g_total is None else {k: g_total[k] + v * n for k, v in g.items()}
    assert torch.allclose(packed, total / sum(n_reply), atol=1e-5)
    for k in g_packed:
        assert torch.allclose(g_packed[k], g_total[k] / sum(n_reply), atol=1e-5, rtol=1e-4), k
    # a batch of groups is drawn whole per image, as a function of the step
    task2 = VisionTask(lm.model, lm.tokenizer, tower, None, VisionTrainConfig(align_frac=0, batch_size=5, pack=3),
                       data, rows, [], True, None)
    stage, groups = task2.batch(3, 0)
    assert stage == "questions" and sum(map(len, groups)) == 5 and all(len({r[0] for r in g}) == 1 and len(g) <= 3 for g in groups)
    assert task2.batch(3, 0) == (stage, groups)  # a function of the step (exact resume)
    # with adapters and captions, the first stage puts the caption's words where the image goes:
    # the packed loss is the mean over reply tokens of each question asked of that text
    caption = (0, CAPTION_QUESTION, "a red circle", "caption")
    task3 = VisionTask(lm.model, lm.tokenizer, tower, None, VisionTrainConfig(align_frac=0, lora_rank=2), data,
                       rows + [caption], [], True, None)
    assert [task3.stage(s) for s in (0, task3.text_steps - 1, task3.text_steps)] == ["text", "text", "questions"]
    with torch.no_grad():
        packed = task3.loss(lm.model, ("text", [rows[:4]]))
        words = lm.tokenizer.encode("a red circle", check=False)
        ces = []
        for _, q, a, _ in rows[:4]:
            p, reply = task3._ids(q, a)
            k = p.index(IMAGE)
            ids = p[:k] + words + p[k + 1:] + reply
            logits = lm.model(torch.tensor([ids]))[0][0]  # (T, V)
            first = len(ids) - len(reply)
            ces.append(F.cross_entropy(logits[first - 1:-1].float(), torch.tensor(reply), reduction="none"))
    assert torch.allclose(packed, torch.cat(ces).mean(), atol=1e-5)


def test_answer_balance_gives_each_answer_of_a_question_an_equal_share():
    from lmforge.train.vision import answer_balance

    rows = [(i, "is it red?", "no", "yes/no") for i in range(6)] + [(6, "is it red?", "yes", "yes/no"),
                                                                    (7, "what shape?", "circle", "shape")]
    w = answer_balance(rows)
    assert w[("is it red?", "no")] * 6 == pytest.approx(w[("is it red?", "yes")] * 1)  # equal total weight
    assert w[("is it red?", "no")] * 6 + w[("is it red?", "yes")] == pytest.approx(7)  # the question keeps its rows' weight
    assert w[("what shape?", "circle")] == 1.0
