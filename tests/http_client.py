"""The real `openai` Python package against bitnetd's HTTP API (run by tests/http.rs).

usage: http_client.py SCENARIO (--url URL | --uds PATH) [--key KEY]

Scenarios print one JSON object on stdout with what they saw; an unexpected answer raises (exit status 1).
- suite:  chat (one body and streamed), stop strings, usage, completions, models, a 400 naming its parameter
- unauthorized: a request without the key gets openai.AuthenticationError (401)
- busy:   one request, which the test has arranged to find the queue full: openai.RateLimitError (429)
- cancel: a long streamed request, closed after its first tokens
- metrics: GET /metrics parsed by prometheus_client's OpenMetrics parser
"""

import argparse
import json
import sys

import openai

try:  # the HTTP client the installed openai package is built on
    import httpx2 as httpx
except ImportError:
    import httpx


def client(args, key=None):
    if args.uds:
        http = httpx.Client(transport=httpx.HTTPTransport(uds=args.uds), timeout=60)
        base = "http://bitnetd/v1"
    else:
        http = httpx.Client(timeout=60)
        base = args.url + "/v1"
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=base, api_key=key or "none", http_client=http, max_retries=0)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def suite(args):
    c = client(args, args.key)
    out = {}
    msgs = [{"role": "user", "content": "What is a dog?"}]

    # One body.
    raw = c.chat.completions.with_raw_response.create(model="bitnet", messages=msgs, max_tokens=8, temperature=0)
    r = raw.parse()
    check(r.object == "chat.completion", r)
    check(r.choices[0].message.role == "assistant", r)
    text = r.choices[0].message.content
    check(isinstance(text, str) and text, r)
    check(r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r)
    out["chat"] = {"text": text, "finish_reason": r.choices[0].finish_reason, "usage": r.usage.model_dump(),
                   "route_header": raw.headers.get("x-bitnetd-route"), "bitnetd": r.model_extra.get("bitnetd")}

    # Streamed, with usage: the same greedy text.
    raw = c.chat.completions.with_raw_response.create(
        model="bitnet", messages=msgs, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    deltas, finish, usage, last_extra = [], None, None, None
    for chunk in raw.parse():
        check(chunk.object == "chat.completion.chunk", chunk)
        if chunk.choices:
            d = chunk.choices[0].delta
            if d.content:
                deltas.append(d.content)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
                last_extra = chunk.model_extra.get("bitnetd")
        if chunk.usage:
            usage = chunk.usage
    check("".join(deltas) == text, (deltas, text))
    check(usage is not None and usage.completion_tokens == out["chat"]["usage"]["completion_tokens"], usage)
    out["stream"] = {"pieces": len(deltas), "finish_reason": finish, "bitnetd": last_extra,
                     "route_header": raw.headers.get("x-bitnetd-route"),
                     "content_type": raw.headers.get("content-type")}

    # Stop strings: the greedy text cut before the stop string.
    long = c.chat.completions.create(model="bitnet", messages=msgs, max_tokens=24, temperature=0)
    full = long.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    check(len(stop.strip()) > 0, full)
    cut = c.chat.completions.create(model="bitnet", messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    cut_text = cut.choices[0].message.content
    check(cut.choices[0].finish_reason == "stop" and stop not in cut_text and full.startswith(cut_text),
          (full, stop, cut_text))
    out["stop"] = {"full": full, "stop": stop, "text": cut_text}

    # Completions, one body and streamed.
    comp = c.completions.create(model="bitnet", prompt="The dog", max_tokens=6, temperature=0)
    check(comp.object == "text_completion" and comp.choices[0].text, comp)
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="bitnet", prompt="The dog", max_tokens=6, temperature=0, stream=True)
                       if ch.choices)
    check(streamed == comp.choices[0].text, (streamed, comp))
    out["completion"] = {"text": comp.choices[0].text, "usage": comp.usage.model_dump()}

    # Models.
    out["models"] = [m.id for m in c.models.list()]

    # A parameter bitnetd does not serve.
    try:
        c.chat.completions.create(model="bitnet", messages=msgs, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        out["bad"] = {"status": e.status_code, "param": e.body.get("param"), "code": e.body.get("code")}
    return out


def unauthorized(args):
    try:
        client(args, "wrong-key").chat.completions.create(model="bitnet", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        wrong = e.status_code
    try:
        client(args, None).models.list()
        raise AssertionError("no key was accepted")
    except openai.AuthenticationError as e:
        return {"wrong_key": wrong, "no_key": e.status_code}


def busy(args):
    try:
        client(args, args.key).chat.completions.create(
            model="bitnet", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        raise AssertionError("a request beyond the queue was accepted")
    except openai.RateLimitError as e:
        return {"status": e.status_code, "retry_after": e.response.headers.get("retry-after"),
                "code": e.body.get("code")}


def cancel(args):
    s = client(args, args.key).chat.completions.create(
        model="bitnet", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=2000,
        temperature=20.0, seed=1, stream=True)
    got = 0
    for chunk in s:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    s.close()
    return {"tokens_before_close": got}


def metrics(args):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    http = httpx.Client(transport=httpx.HTTPTransport(uds=args.uds)) if args.uds else httpx.Client()
    base = "http://bitnetd" if args.uds else args.url
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    r = http.get(base + "/metrics", headers=headers)
    check(r.status_code == 200, r.text)
    samples = []
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.append({"name": s.name, "labels": s.labels, "value": s.value})
    return {"content_type": r.headers.get("content-type"), "samples": samples}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--url")
    p.add_argument("--uds")
    p.add_argument("--key")
    args = p.parse_args()
    result = {"suite": suite, "unauthorized": unauthorized, "busy": busy, "cancel": cancel,
              "metrics": metrics}[args.scenario](args)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
