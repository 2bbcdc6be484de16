"""Ask questions about a running stream, then let an SGLang frontend program write a report.

    export FLASHCACHE_API_KEY=$(flashcache-stream keys create --tenant demo --file keys.jsonl)
    flashcache-stream serve --sglang-url http://127.0.0.1:30000 --api-keys keys.jsonl \
        --media-root . &                                                  # the stream service
    python examples/stream_ask.py --api http://127.0.0.1:8000 --source video.mp4 \
        --sglang-url http://127.0.0.1:30000

The questions go to the stream service (``POST /streams/{id}/ask``), which answers from the
stream's compressed memory in SGLang; the turns form one conversation, so each question sees
the earlier answers. The report step is an ordinary SGLang frontend program (``sgl.function``)
run on the same server; it is skipped without ``--sglang-url``.

Why the frontend program does not attach the videos itself: ``sgl.video`` sends frames as
images, a different prompt than the stream memory's ``video_data`` prefix, so it would not
reuse the cached (compressed) memory. Questions therefore go through the service.
"""

from __future__ import annotations

import argparse
import os
import time

import requests

QUESTIONS = ["What is shown in the video so far?", "What changed most recently?", "Is anything moving?"]


def start_or_attach(api: str, args: argparse.Namespace) -> tuple[str, str]:
    if args.stream_id:
        return args.stream_id, args.token
    response = requests.post(f"{api}/streams", json={"source": args.source, "fps": 2, "budget": {"kv_cap_tokens": 4096}},
                             headers={"Authorization": f"Bearer {args.api_key}"}, timeout=30)
    response.raise_for_status()
    return response.json()["stream_id"], response.json()["token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--source", help="video file or rtsp:// URL to start a stream from")
    parser.add_argument("--stream-id")
    parser.add_argument("--token")
    parser.add_argument("--api-key", default=os.environ.get("FLASHCACHE_API_KEY"),
                        help="operator API key to create the stream (default: $FLASHCACHE_API_KEY)")
    parser.add_argument("--sglang-url", help="SGLang server for the report step")
    parser.add_argument("--wait-chunks", type=int, default=2)
    args = parser.parse_args()
    if not args.source and not (args.stream_id and args.token):
        parser.error("give --source, or --stream-id and --token")
    if args.source and not args.api_key:
        parser.error("creating a stream needs an operator API key: --api-key or FLASHCACHE_API_KEY")

    api = args.api.rstrip("/")
    stream_id, token = start_or_attach(api, args)
    headers = {"Authorization": f"Bearer {token}"}
    while requests.get(f"{api}/streams/{stream_id}", headers=headers, timeout=30).json()["chunks_ingested"] < args.wait_chunks:
        time.sleep(0.5)

    answers = []
    for question in QUESTIONS:
        reply = requests.post(
            f"{api}/streams/{stream_id}/ask", json={"question": question, "conversation_id": "example"}, headers=headers, timeout=300
        )
        reply.raise_for_status()
        body = reply.json()
        answers.append((question, body["text"]))
        print(f"Q: {question}\nA: {body['text']}\n   (ttft {body['ttft_s']:.2f} s, {body['cached_tokens']} cached tokens)")

    if args.sglang_url:
        import sglang as sgl

        @sgl.function
        def report(s, observations):
            s += sgl.system("You write short incident reports from observations of a video stream.")
            s += sgl.user("Observations:\n" + "\n".join(f"- {q} {a}" for q, a in observations) + "\nWrite a two-sentence report.")
            s += sgl.assistant(sgl.gen("report", max_tokens=96, temperature=0))

        sgl.set_default_backend(sgl.RuntimeEndpoint(args.sglang_url))
        print("Report:", report.run(observations=answers)["report"])


if __name__ == "__main__":
    main()
