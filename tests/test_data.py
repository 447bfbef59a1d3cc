"""Training examples: schema rules of every mode, determinism, input files, make_tfrecord CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from gptsan import data, records
from gptsan.errors import GPTSANError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")
MAKE_TFRECORD = os.path.join(ROOT, "scripts", "make_tfrecord.py")
SHOW_TFRECORD = os.path.join(ROOT, "scripts", "show_tfrecord.py")

# A hand-made vocabulary: words, then <BR>, the byte tokens and the 7 control tokens.
WORDS = ["吾輩", "は", "猫", "で", "ある", "。", "名前", "まだ", "無い", "ー", "！", "犬", "も",
         "走る", "？", "空", "青い", "海", "広い", "と"]
VOCAB = WORDS + ["<BR>", "<|byte0|>", "<|byte1|>",
                 "<|startoftext|>", "<|inputmask|>", "<|separator|>", "<|nottoken|>",
                 "<|bagoftoken|>", "<|segmenter|>", "<|endoftext|>"]
N = len(VOCAB)
SPECIAL = data.SpecialTokens(
    sot=N - 7, msk=N - 6, sep=N - 5, not_token=N - 4, bag=N - 3, seg=N - 2, eot=N - 1,
    nl=VOCAB.index("<BR>"), dots=frozenset({VOCAB.index("。"), VOCAB.index("！"),
                                            VOCAB.index("？")}),
    last_token=VOCAB.index("<|byte0|>") - 1)
ID = {w: i for i, w in enumerate(VOCAB)}


def ids(words):
    return [ID[w] for w in words.split()]


# Two documents of a file, one line per string (words separated by spaces).
DOCUMENTS = [
    ["吾輩 は 猫 で ある 。", "名前 は まだ 無い 。", "犬 も 走る ー ー ー ー ！ ！ ！",
     "空 は 青い 。 海 は 広い 。", "猫 と 犬 ？ 猫 猫 。"],
    ["海 は 青い 。", "空 と 海 と 猫 。 吾輩 は 犬 で ある ！", "名前 は 無い 。 ー ー 。"],
]


def build(mode, seed=0, num_context=24, **kwargs):
    options = data.ExampleOptions(mode=mode, num_context=num_context, **kwargs)
    docs = data.encode_documents([[line for line in doc] for doc in DOCUMENTS], ids, SPECIAL)
    examples = data.ExampleBuilder(options, SPECIAL, np.random.default_rng(seed)).build(docs, 7)
    return options, docs, examples


def next_sentence_end(ex, sp=SPECIAL):
    """Index of the SEP that ends a next sentence (x[0] is SOT), or 0 without one."""
    for p in range(1, ex.num_input):
        if ex.x[p] == sp.sep and ex.y[p - 1] in (sp.sep, sp.eot):
            return p
    return 0


def check_example(ex, options, sp=SPECIAL):
    """The schema rules of docs/ARCHITECTURE.md "Training data" for one example."""
    ctx = options.num_context
    x, y, n = ex.x, ex.y, ex.num_input
    assert x.shape == y.shape == (ctx,) and x.dtype == y.dtype == np.int32
    assert x[0] == sp.sot and 1 <= n < ctx and x[n] == sp.seg
    assert list(x).count(sp.seg) == 1 and list(x).count(sp.sot) == 1
    content = ctx
    while x[content - 1] == sp.not_token:
        content -= 1
    assert np.all(y[content:] == data.NO_TARGET)  # padding: NOT fed, no loss
    assert sp.not_token not in x[:content]
    if sp.eot in x:
        assert x[content - 1] == sp.eot and list(x).count(sp.eot) == 1
        assert y[content - 1] == data.NO_TARGET and y[content - 2] == sp.eot
    else:  # cut in the middle of the text: the last token predicts the next real token
        assert y[content - 1] != data.NO_TARGET
    # prefix: SOT, optional next sentence ending in SEP, prefix tokens; only MLM / NSP targets
    ns_end = next_sentence_end(ex, sp)
    start = ns_end + 1
    prefix_len = n - start
    if options.mode == "lm":
        assert n == 1 and ns_end == 0
    if ns_end:
        assert options.use_nextsent and ns_end - 1 <= ctx // 2 - 1
        assert sp.sep not in x[1:ns_end]
    picked = [p for p in range(start, n) if y[p - 1] != data.NO_TARGET]
    expected = min(int(options.num_mask * prefix_len), options.max_mask)
    if ns_end:
        expected = max(expected - 1, 0)
    assert len(picked) == expected
    for p in range(start, n):  # shifted MLM: the target sits one position before the mask
        assert x[p] != sp.msk or y[p - 1] != data.NO_TARGET
    for p in picked:  # 80% MSK, 10% a random ordinary token, 10% unchanged
        assert y[p - 1] < sp.sot and (x[p] in (sp.msk, y[p - 1]) or x[p] < sp.last_token)
    assert np.all(y[n - 1:n] == data.NO_TARGET)  # the last prefix token predicts nothing
    assert sp.msk not in x[n:]
    # LM part: next-token targets, dots fed as SEP, runs fed and predicted as `token BAG`
    lm_end = content - 1 if x[content - 1] == sp.eot else content
    for p in range(n, lm_end - 1):
        fed, real = x[p + 1], y[p]
        if fed == sp.sep:
            assert real in sp.dots
        elif fed == sp.bag:
            assert real == sp.bag and y[p - 1] <= sp.last_token
            assert x[p] == y[p - 1] or (x[p] == sp.sep and y[p - 1] in sp.dots)
        else:
            assert real == fed
    fed_lm = [int(t) for t in x[n + 1:lm_end]]
    assert not set(fed_lm) & sp.dots
    for a, b, c in zip(fed_lm, fed_lm[1:], fed_lm[2:]):
        assert not (a == b == c and a <= sp.last_token and a != sp.nl)
    if options.mode == "mlm":
        # all prefix but one token or a `token BAG` pair (a prefix never splits such a run)
        assert lm_end - (n + 1) <= 2 or x[n + 2] == sp.bag


def reconstruct(examples):
    """The document text the examples cover (masks restored, SEP/BAG undone) as a list of
    (token, is_bag_run) items, plus the negative next sentences that were drawn."""
    items = []
    for ex in examples:
        x, y, n = ex.x, ex.y, ex.num_input
        ns_end = next_sentence_end(ex)
        if ns_end and y[ns_end - 1] == SPECIAL.sep:  # a real continuation: part of the text
            items += [(int(t), False) for t in x[1:ns_end]]
        for p in range(ns_end + 1, n):
            items.append((int(y[p - 1]) if y[p - 1] != data.NO_TARGET else int(x[p]), False))
        content = int(np.sum(x != SPECIAL.not_token))
        lm_end = content - 1 if x[content - 1] == SPECIAL.eot else content
        real = [int(t) for t in y[n:lm_end - 1]]
        for k, token in enumerate(real):
            if token == SPECIAL.bag:
                continue
            items.append((token, k + 1 < len(real) and real[k + 1] == SPECIAL.bag))
    return items


def matches(items, raw):
    """True when the items spell the raw tokens exactly (a BAG item eats a run of >= 3)."""
    pos = 0
    for token, bag in items:
        if bag:
            run = 0
            while pos < len(raw) and raw[pos] == token:
                pos += 1
                run += 1
            if run < 3:
                return False
        else:
            if pos >= len(raw) or raw[pos] != token:
                return False
            pos += 1
    return pos == len(raw)


def split_by_document(examples, docs):
    """Consecutive examples of each document (the builder goes document by document)."""
    groups, k = [], 0
    for doc in docs:
        group = []
        while k < len(examples):
            group.append(examples[k])
            k += 1
            if matches(reconstruct(group), doc.tokens):
                break
        groups.append(group)
    return groups


def test_lm_transform_seps_and_bags():
    fed, target, start = (a.tolist() for a in data.lm_transform(
        ids("猫 。 ー ー ー ー ！ ！ ！ 犬 犬 <BR> <BR> <BR>"), SPECIAL))
    assert fed == ids("猫") + [SPECIAL.sep] + ids("ー") + [SPECIAL.bag, SPECIAL.sep, SPECIAL.bag] \
        + ids("犬 犬 <BR> <BR> <BR>")
    assert target == ids("猫 。 ー") + [SPECIAL.bag] + ids("！") + [SPECIAL.bag] \
        + ids("犬 犬 <BR> <BR> <BR>")
    assert start == [0, 1, 2, 2, 6, 6, 9, 10, 11, 12, 13]
    byte = ID["<|byte1|>"]  # byte tokens are never bagged (published: ids <= LAST_TOKEN only)
    assert data.lm_transform([byte] * 4, SPECIAL)[0].tolist() == [byte] * 4
    assert [len(a) for a in data.lm_transform([], SPECIAL)] == [0, 0, 0]


@pytest.mark.parametrize("mode,kwargs", [
    ("lm", {}),
    ("mlm", {"num_mask": 0.3}),
    ("mlm", {"num_mask": 0.3, "use_nextsent": True}),
    ("hybrid", {"num_mask": 0.25, "hybrid_rate": 0.7}),
    ("hybrid", {"num_mask": 0.25, "use_nextsent": True, "nextsent_rate": 0.8}),
])
def test_every_example_follows_the_schema_and_no_text_is_lost(mode, kwargs):
    for seed in range(6):
        options, docs, examples = build(mode, seed=seed, **kwargs)
        assert examples
        for ex in examples:
            check_example(ex, options)
            assert ex.class_id == 7
        if not kwargs.get("use_nextsent"):  # without negatives the examples spell the documents
            groups = split_by_document(examples, docs)
            assert sum(len(g) for g in groups) == len(examples)
            for group, doc in zip(groups, docs):
                assert matches(reconstruct(group), doc.tokens)


def test_modes_differ_as_specified():
    _, _, lm = build("lm", num_context=16)
    assert all(ex.num_input == 1 for ex in lm) and len(lm) > 2  # carried over, not dropped
    lengths = set()
    for seed in range(10):
        lengths |= {ex.num_input for ex in build("hybrid", hybrid_rate=0.5, seed=seed)[2]}
    assert 1 in lengths and len(lengths) > 5  # some plain lm, random prefix lengths otherwise
    _, _, nsp = build("mlm", use_nextsent=True, seed=1)
    labels = [int(ex.y[next_sentence_end(ex) - 1]) for ex in nsp if next_sentence_end(ex)]
    assert SPECIAL.sep in labels and SPECIAL.eot in labels


def test_mask_shares():
    kinds = {"msk": 0, "random": 0, "kept": 0}
    for seed in range(30):
        for ex in build("mlm", num_mask=1.0, seed=seed)[2]:
            for p in range(1, ex.num_input):
                if ex.y[p - 1] != data.NO_TARGET:
                    kinds["msk" if ex.x[p] == SPECIAL.msk
                          else "kept" if ex.x[p] == ex.y[p - 1] else "random"] += 1
    total = sum(kinds.values())
    assert total > 1000
    assert 0.75 < kinds["msk"] / total < 0.85  # 80% MSK, 10% random, 10% unchanged
    assert 0.06 < kinds["random"] / total < 0.14 and 0.06 < kinds["kept"] / total < 0.16


def test_max_mask_and_no_offset_mlm():
    options, _, examples = build("mlm", num_mask=1.0, max_mask=2, num_context=32)
    for ex in examples:
        check_example(ex, options)
    _, _, plain = build("mlm", num_mask=0.3, num_context=32)
    _, _, shifted = build("mlm", num_mask=0.3, num_context=32, no_offset_mlm=True)
    for a, b in zip(plain, shifted):
        assert list(b.x) == [a.x[0]] + list(a.x[2:]) + [SPECIAL.eot]
        assert np.array_equal(a.y, b.y)
        masked = np.nonzero(b.x == SPECIAL.msk)[0]
        assert np.all(b.y[masked] != data.NO_TARGET)  # the target sits at the mask itself
    with pytest.raises(GPTSANError, match="no_offset_mlm"):
        data.ExampleOptions(mode="lm", no_offset_mlm=True)


def test_same_seed_same_examples():
    for mode in ("hybrid", "mlm"):
        _, _, a = build(mode, seed=5, num_mask=0.3, use_nextsent=True)
        _, _, b = build(mode, seed=5, num_mask=0.3, use_nextsent=True)
        _, _, c = build(mode, seed=6, num_mask=0.3, use_nextsent=True)
        assert [(e.x.tobytes(), e.y.tobytes(), e.num_input) for e in a] == \
            [(e.x.tobytes(), e.y.tobytes(), e.num_input) for e in b]
        assert [e.x.tobytes() for e in a] != [e.x.tobytes() for e in c]


def test_bad_options_are_one_line_errors():
    for kwargs in ({"mode": "gpt"}, {"num_context": 4}, {"num_mask": 1.5}, {"hybrid_rate": -1}):
        with pytest.raises(GPTSANError) as err:
            data.ExampleOptions(**kwargs)
        assert "\n" not in str(err.value)


def test_split_documents():
    text = "一行目\r\n二行目\r\n\r\n  \n三行目\r四行目\n\n"
    assert data.split_documents(text, split_on_blank=False) == [
        ["一行目", "二行目", "", "", "三行目", "四行目"]]
    assert data.split_documents(text, split_on_blank=True) == [
        ["一行目", "二行目"], ["三行目", "四行目"]]


# ---------------------------------------------------------------------------------------------
# Input files


def test_resolve_globs_lists_and_class_csv(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("猫である。\n", encoding="utf-8")
    assert [p for p, _ in data.resolve_input_files([str(tmp_path / "*.txt")])] == \
        [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt")]
    (tmp_path / "classes.csv").write_text("filename,fileid\na.txt,3\nc.txt,5\n", encoding="utf-8")
    assert data.resolve_input_files([str(tmp_path / "classes.csv")]) == \
        [(str(tmp_path / "a.txt"), 3), (str(tmp_path / "c.txt"), 5)]
    (tmp_path / "list.lst").write_text(f"{tmp_path / 'b.txt'}\n{tmp_path / 'a.txt'} 9\n")
    assert data.resolve_input_files([str(tmp_path / "list.lst")]) == \
        [(str(tmp_path / "a.txt"), 9), (str(tmp_path / "b.txt"), -1)]
    with pytest.raises(GPTSANError, match="no input files matched"):
        data.resolve_input_files([str(tmp_path / "*.json")])
    (tmp_path / "bad.csv").write_text("filename,fileid\na.txt,x\n", encoding="utf-8")
    with pytest.raises(GPTSANError, match="bad.csv:2"):
        data.resolve_input_files([str(tmp_path / "bad.csv")])


def test_order_files_is_seeded():
    files = [(f"f{k}", -1) for k in range(20)]
    a = [t.path for t in data.order_files(files, 1)]
    assert a == [t.path for t in data.order_files(files, 1)]
    assert a != [t.path for t in data.order_files(files, 2)]
    assert sorted(a) == sorted(p for p, _ in files)


# ---------------------------------------------------------------------------------------------
# The make_tfrecord / show_tfrecord CLIs on a small Japanese corpus with the real tokenizer

CORPUS = {
    "neko.txt": "吾輩は猫である。名前はまだ無い。\n"
                "どこで生れたかとんと見当がつかぬ。\n"
                "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。\n"
                "\n"
                "吾輩はここで始めて人間というものを見た。しかもあとで聞くとそれは書生という人間中で"
                "一番獰悪な種族であったそうだ。\n",
    "tenki.txt": "今日は朝からよく晴れています！！！\n"
                 "午後からは雲が広がり、夕方には雨が降るでしょう。\n"
                 "気温は平年並みですが、風が強いので注意してください。\n"
                 "明日の天気はどうでしょうか？\n",
    "blog.txt": "わーーーーい、ついに新しいパソコンを買いました。\n"
                "すごいwwwwwwwwwwww 速すぎて笑いました！！！！！！！！！\n"
                "詳しくは https://example.com/blog/123 を見てね。\n"
                "\n"
                "次回はキーボードの話をします。お楽しみに。\n",
    "ryouri.txt": "材料は玉ねぎ、にんじん、じゃがいも、牛肉です。\n"
                  "まず野菜を食べやすい大きさに切ります。\n"
                  "鍋に油をひいて肉を炒め、野菜を加えてさらに炒めます。\n"
                  "水を入れて二十分ほど煮込んだら、ルーを溶かして完成です。\n",
}


def vocabulary_files():
    """The project's vocabulary, or the published one while the project's is not built."""
    for folder in (ROOT, REFERENCE):
        vocab, emoji = os.path.join(folder, "ja-swe36k.txt"), os.path.join(folder, "emoji.json")
        if os.path.isfile(vocab) and os.path.isfile(emoji):
            return vocab, emoji
    pytest.skip("no vocabulary: neither the project's ja-swe36k.txt nor ../shared/reference")


@pytest.fixture(scope="module")
def encoder():
    from gptsan.tokenization import SWEEncoder

    return SWEEncoder.from_files(*vocabulary_files())


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in CORPUS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def run_make(argv, capsys=None):
    """Runs make_tfrecord.py's main in this process; returns its stdout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tfrecord", MAKE_TFRECORD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocab, emoji = vocabulary_files()
    assert module.main(argv + ["--vocabulary", vocab, "--emoji", emoji]) == 0
    return capsys.readouterr().out if capsys else ""


def read_back(paths):
    rows = []
    for path in paths:
        for _, ex in records.read_examples(str(path)):
            rows.append((data.Example(x=ex["x"].astype(np.int32), y=ex["y"].astype(np.int32),
                                      num_input=int(ex["num_input"][0])), int(ex["i"][0])))
    return rows


@pytest.mark.parametrize("mode,flags", [
    ("lm", []),
    ("mlm", ["--use_nextsent", "--num_mask", "0.15"]),
    ("hybrid", ["--use_nextsent", "--hybrid_rate", "0.8", "--nextsent_rate", "0.5"]),
])
def test_make_tfrecord_examples_follow_the_schema(corpus, tmp_path, encoder, capsys, mode, flags):
    out = run_make(["--input_files", str(corpus / "*.txt"), "--mode", mode, "--num_context", "48",
                    "--output_prefix", str(tmp_path / mode), "--data_per_file", "5",
                    "--num_process", "1", "--seed", "3"] + flags, capsys)
    shards = sorted(tmp_path.glob(f"{mode}_*.tfrecord"))
    assert len(shards) > 1 and f"wrote {len(shards)} shard(s)" in out
    rows = read_back(shards)
    options = data.ExampleOptions(mode=mode, num_context=48,
                                  num_mask=0.15 if mode == "mlm" else 0.08,
                                  use_nextsent="--use_nextsent" in flags)
    special = data.SpecialTokens.from_encoder(encoder)
    for ex, _ in rows:
        check_example(ex, options, special)
    assert [i for _, i in rows] == list(range(len(rows)))  # no class ids: running example ids
    assert f"{len(rows)} examples from 4 file(s)" in out and "padding" in out
    if mode == "lm":  # every line of the corpus is in the data (carried over, nothing dropped)
        text = "".join(encoder.decode([t for t in ex.x[2:] if t < special.sot]) for ex, _ in rows)
        assert "明日の天気はどうでしょうか" in text and "ルーを溶かして完成" in text
        assert "<URL>" in text  # --clean_text is on by default


def test_same_seed_same_bytes_for_any_num_process(corpus, tmp_path, capsys):
    base = ["--input_files", str(corpus / "*.txt"), "--mode", "hybrid", "--use_nextsent",
            "--num_context", "40", "--data_per_file", "6"]
    run_make(base + ["--output_prefix", str(tmp_path / "one"), "--num_process", "1",
                     "--seed", "11"], capsys)
    run_make(base + ["--output_prefix", str(tmp_path / "two"), "--num_process", "2",
                     "--seed", "11"], capsys)
    run_make(base + ["--output_prefix", str(tmp_path / "other"), "--num_process", "2",
                     "--seed", "12"], capsys)

    def shard_bytes(prefix):
        return [p.read_bytes() for p in sorted(tmp_path.glob(f"{prefix}_*.tfrecord"))]

    assert shard_bytes("one") == shard_bytes("two") and len(shard_bytes("one")) > 1
    assert shard_bytes("one") != shard_bytes("other")


def test_class_csv_bad_files_and_force(corpus, tmp_path, capsys):
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (corpus / "classes.csv").write_text(
        "filename,fileid\nneko.txt,4\ntenki.txt,9\nlatin1.txt,2\nmissing.txt,5\n", encoding="utf-8")
    prefix = str(tmp_path / "cls")
    argv = ["--input_files", str(corpus / "classes.csv"), "--num_context", "32",
            "--output_prefix", prefix, "--num_process", "2"]
    run_make(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert "latin1.txt is not UTF-8" in err and "missing.txt" in err
    rows = read_back(sorted(tmp_path.glob("cls_*.tfrecord")))
    counts = {4: sum(i == 4 for _, i in rows), 9: sum(i == 9 for _, i in rows)}
    assert set(i for _, i in rows) == {4, 9} and min(counts.values()) > 0
    assert f"per class: 4: {counts[4]}, 9: {counts[9]}" in captured.out
    assert "skipped 2 bad file(s)" in captured.out
    with pytest.raises(GPTSANError, match="already exists; use --force"):
        run_make(argv)
    run_make(argv + ["--force", "--mode", "mlm"])
    assert len(read_back(sorted(tmp_path.glob("cls_*.tfrecord")))) > 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.startswith(".make")]


def test_no_match_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, MAKE_TFRECORD, "--input_files", str(tmp_path / "nothing" / "*.txt"),
         "--output_prefix", str(out / "lm")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no input files matched")
    assert len(result.stderr.strip().splitlines()) == 1 and list(out.iterdir()) == []


def test_show_tfrecord(corpus, tmp_path, capsys):
    run_make(["--input_files", str(corpus / "neko.txt"), str(corpus / "blog.txt"),
              "--mode", "mlm", "--use_nextsent", "--num_mask", "0.3", "--num_context", "64",
              "--output_prefix", str(tmp_path / "m"), "--seed", "1"], capsys)
    import importlib.util

    spec = importlib.util.spec_from_file_location("show_tfrecord", SHOW_TFRECORD)
    show = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(show)
    vocab, emoji = vocabulary_files()
    shard = str(tmp_path / "m_0000.tfrecord")
    assert show.main([shard, "--count", "50", "--vocabulary", vocab, "--emoji", emoji]) == 0
    out = capsys.readouterr().out
    assert "=== example 0:" in out and "--- prefix" in out and "⟨SEG⟩" in out
    assert "[MSK→" in out and ("⟨SEP:next⟩" in out or "⟨SEP:not-next⟩" in out)
    run_make(["--input_files", str(corpus / "blog.txt"), "--num_context", "64",
              "--output_prefix", str(tmp_path / "l")], capsys)
    assert show.main([str(tmp_path / "l_0000.tfrecord"), "--vocabulary", vocab,
                      "--emoji", emoji]) == 0
    out = capsys.readouterr().out
    assert "w⟨BAG⟩" in out and "⟨BAG⟩ 速すぎて" in out and "⟨SEP:。⟩" in out and "⟨EOT⟩" in out
    assert "！⟨BAG⟩" in out or "⟨SEP:！⟩⟨BAG⟩" in out
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(GPTSANError) as err:  # run_cli prints it as one line, exit 2
        show.main([str(bad), "--vocabulary", vocab, "--emoji", emoji])
    assert "not a valid TFRecord" in str(err.value) and "\n" not in str(err.value)
    assert capsys.readouterr().out == ""
