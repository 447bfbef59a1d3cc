"""`make demo`: shows GPTSAN working on the embedded default, each step labelled with its command."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gptsan.tokenization import SWEEncoder  # noqa: E402

VOCABULARY = os.path.join(ROOT, "ja-swe36k.txt")
EMOJI = os.path.join(ROOT, "emoji.json")
SAMPLE_TEXTS = (
    "明日の天気は晴れ時々くもり、最高気温は２５度の予想です。",
    "髙島屋と高島屋、會社と会社は同じトークンになります。",
    "詳しくは https://www.example.jp/news まで。お問い合わせ: info@example.com 🙂👍",
    "2024年4月1日(月) 10:30開始、参加費は1,500円(税込)です。",
)


def banner(title, command):
    print(f"\n=== {title}\n$ {command}")


def demo_tokenizer():
    encoder = SWEEncoder.from_files(VOCABULARY, EMOJI)
    banner("Tokenizer: the project's own ja-swe vocabulary",
           "python -c \"from gptsan.tokenization import SWEEncoder; "
           "e = SWEEncoder.from_files('ja-swe36k.txt', 'emoji.json'); print(e.encode('...'))\"")
    print(f"vocabulary: {len(encoder)} entries")
    for text in SAMPLE_TEXTS:
        ids = encoder.encode(text, clean=True)
        print(f"\ntext    : {text}")
        print(f"ids     : {ids}")
        print(f"tokens  : {' | '.join(encoder.id_to_token(i) for i in ids)}")
        print(f"decoded : {encoder.decode(ids)}")


def main():
    demo_tokenizer()


if __name__ == "__main__":
    main()
