//! The server end to end: a real `cathedral serve` on the tiny checkpoint, over mTLS, driven by
//! the official `openai` Python client, curl, and reqwest through `client::mtls_client`.
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{png_data_url, python, tiny_model, Certs, Server};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn chat(text: &str, max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0})
}

fn image_chat(url: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this."},
        {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 3, "temperature": 0})
}

async fn post(http: &reqwest::Client, server: &Server, body: &Value) -> (u16, Value) {
    let resp = http
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
    (status, value)
}

async fn get(http: &reqwest::Client, server: &Server, path: &str) -> (u16, String) {
    let resp = http.get(server.url(path)).send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn openai_python_client_sync_stream_image_models() {
    let server = Server::start("openai", tiny_model(), &["--vision-enabled", "--no-plain"]);
    let certs = Certs::get();
    let user = certs.client("user");
    let image_file = support::scratch().join("image-url.txt");
    std::fs::write(&image_file, png_data_url(96, 64)).unwrap();
    let out = Command::new(python())
        .arg(support::repo_root().join("runtime/tests/support/openai_peer.py"))
        .arg(server.base())
        .arg(&certs.ca.cert)
        .arg(&user.cert)
        .arg(&user.key)
        .arg(&image_file)
        .output()
        .expect("run .venv/bin/python (scripts/setup.sh creates it)");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["models"], json!(["tiny-model"]));

    let sync = &r["sync"];
    assert_eq!(sync["object"], "chat.completion");
    assert_eq!(sync["role"], "assistant");
    let usage = &sync["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && (1..=8).contains(&c), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);

    // Same prompt, greedy: the stream carries the same text as a sync answer would.
    let stream = &r["stream"];
    assert_eq!(stream["first_role"], "assistant");
    assert_eq!(stream["objects"], json!(["chat.completion.chunk"]));
    assert!(stream["chunks"].as_u64().unwrap() >= 3, "{stream}");
    let su = &stream["usage"];
    assert!(su["completion_tokens"].as_u64().unwrap() >= 1, "{stream}");
    assert_eq!(
        su["total_tokens"].as_u64().unwrap(),
        su["prompt_tokens"].as_u64().unwrap() + su["completion_tokens"].as_u64().unwrap()
    );
    assert!(["stop", "length"].contains(&stream["finish_reason"].as_str().unwrap()));
    assert_eq!(
        stream["content"], sync["content"],
        "greedy stream and sync differ"
    );
    assert_eq!(stream["finish_reason"], sync["finish_reason"]);
    assert_eq!(stream["usage"], sync["usage"]);

    let img = &r["image"];
    let ip = img["usage"]["prompt_tokens"].as_u64().unwrap();
    // Qwen2-VL rules: 96×64 is below the minimum area and scales up to 224×320, i.e.
    // 224·320/1024 = 70 image tokens, plus <|vision_start|> and <|vision_end|>.
    let tp = r["text_only_prompt_tokens"].as_u64().unwrap();
    assert_eq!(ip, tp + 70 + 2, "{img}");
    assert!(img["usage"]["completion_tokens"].as_u64().unwrap() <= 6);

    assert_eq!(r["bad"]["status"], 400, "{}", r["bad"]);
    assert_eq!(r["bad"]["code"], "invalid_value");
}

/// Runs curl; returns (exit code, HTTP status as curl saw it, body).
fn curl(
    server: &Server,
    cert: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (i32, String, String) {
    let certs = Certs::get();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", server.addr.port()))
        .arg("--cacert")
        .arg(&certs.ca.cert)
        .args(["-X", method]);
    if let Some(name) = cert {
        let b = certs.client(name);
        cmd.arg("--cert").arg(&b.cert).arg("--key").arg(&b.key);
    }
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    cmd.arg(server.url(path));
    let out = cmd.output().expect("curl (scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (
        out.status.code().unwrap_or(-1),
        code.trim().to_string(),
        body.to_string(),
    )
}

#[test]
fn curl_mtls_refusals_and_admin_403() {
    let server = Server::start("curl", tiny_model(), &["--vision-enabled", "--no-plain"]);
    let (rc, code, body) = curl(&server, Some("user"), "GET", "/health", None);
    assert_eq!((rc, code.as_str()), (0, "200"), "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["vision"], "ready");
    assert_eq!(health["kill_switch"]["engaged"], false);

    let req = chat("Hi", 3).to_string();
    let (rc, code, body) = curl(
        &server,
        Some("user"),
        "POST",
        "/v1/chat/completions",
        Some(&req),
    );
    assert_eq!((rc, code.as_str()), (0, "200"), "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");

    // Refused at the handshake: no HTTP status at all.
    for who in [None, Some("stranger"), Some("late")] {
        let (rc, code, body) = curl(&server, who, "GET", "/health", None);
        assert_ne!(rc, 0, "{who:?} was let in: {body}");
        assert_eq!(code, "000", "{who:?} got an HTTP answer: {body}");
    }
    // TLS 1.2 is refused unless --allow-tls12.
    let b = Certs::get().client("user");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--tls-max",
            "1.2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", server.addr.port()))
        .arg("--cacert")
        .arg(&Certs::get().ca.cert)
        .arg("--cert")
        .arg(&b.cert)
        .arg("--key")
        .arg(&b.key)
        .arg(server.url("/health"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "TLS 1.2 accepted");
    // The server logs a refusal after the client has already given up: poll, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut log = server.log();
    while log.matches("TLS handshake refused").count() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        log = server.log();
    }
    assert!(log.matches("TLS handshake refused").count() >= 4, "{log}");

    // Authenticated but not an admin.
    for (method, path, body) in [
        ("GET", "/admin/status", None),
        ("POST", "/admin/kill-switch", Some(r#"{"reason":"test"}"#)),
        ("DELETE", "/admin/kill-switch", None),
    ] {
        let (rc, code, out) = curl(&server, Some("user"), method, path, body);
        assert_eq!((rc, code.as_str()), (0, "403"), "{method} {path}: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["type"], "permission_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("user"));
    }
    assert!(
        !server.kill_switch.exists(),
        "a non-admin engaged the kill switch"
    );
    let (rc, code, out) = curl(&server, Some("admin"), "GET", "/admin/status", None);
    assert_eq!((rc, code.as_str()), (0, "200"), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["you"], "admin");
    assert_eq!(v["vision"], "ready");

    // Metrics: requests by route and status, including the 403s above.
    let (rc, code, metrics) = curl(&server, Some("user"), "GET", "/metrics", None);
    assert_eq!((rc, code.as_str()), (0, "200"));
    for needle in [
        r#"cathedral_http_requests_total{route="/v1/chat/completions",status="200"} 1"#,
        r#"cathedral_http_requests_total{route="/admin/status",status="403"} 1"#,
        "cathedral_time_to_first_token_seconds_count 1",
        "cathedral_time_per_output_token_seconds_count 1",
        "cathedral_queue_depth 0",
        "cathedral_kill_switch_engaged 0",
        "cathedral_vision_tower_seconds_count 0",
        "cathedral_resident_memory_bytes",
    ] {
        assert!(metrics.contains(needle), "missing {needle}:\n{metrics}");
    }
}

/// A PNG whose header claims 60000×60000 pixels around a few bytes of data.
fn bomb_png() -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&60_000u32.to_be_bytes());
    ihdr.extend_from_slice(&60_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[test]
fn bad_input_corpus_gets_clear_4xx_then_good_request_works() {
    let server = Server::start(
        "corpus",
        tiny_model(),
        &[
            "--vision-enabled",
            "--no-plain",
            "--max-body-bytes",
            "2000000",
            "--max-images",
            "2",
        ],
    );
    let http = Certs::get().http("user");
    let png = {
        let url = png_data_url(64, 64);
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(url.split_once(',').unwrap().1)
            .unwrap()
    };
    let good_img = png_data_url(64, 64);
    let with_image = |url: String| image_chat(&url);
    let msgs = |m: Value| json!({"messages": m, "max_tokens": 2});
    let user = |c: Value| json!({"messages": [{"role": "user", "content": c}], "max_tokens": 2});
    let long_prompt = "lorem ipsum dolor sit amet ".repeat(3000);

    // (name, raw body, expected status, expected error code)
    let mut cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"messages\": [".to_vec(),
            400,
            "invalid_json",
        ),
        ("not an object", b"[1, 2]".to_vec(), 400, "invalid_json"),
        ("empty body", Vec::new(), 400, "invalid_json"),
        (
            "bad UTF-8",
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
            400,
            "invalid_encoding",
        ),
        (
            "body over the limit",
            {
                let mut b = br#"{"messages":[{"role":"user","content":""#.to_vec();
                b.extend(std::iter::repeat_n(b'a', 2_100_000));
                b.extend_from_slice(br#""}]}"#);
                b
            },
            413,
            "request_too_large",
        ),
    ];
    let json_cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "missing messages",
            json!({"max_tokens": 2}),
            400,
            "invalid_value",
        ),
        (
            "messages not an array",
            json!({"messages": "hi"}),
            400,
            "invalid_value",
        ),
        ("empty messages", msgs(json!([])), 400, "invalid_value"),
        (
            "unknown role",
            msgs(json!([{"role": "wizard", "content": "hi"}])),
            400,
            "invalid_value",
        ),
        (
            "missing role",
            msgs(json!([{"content": "hi"}])),
            400,
            "invalid_value",
        ),
        ("content a number", user(json!(42)), 400, "invalid_value"),
        ("content null", user(Value::Null), 400, "invalid_value"),
        ("content empty array", user(json!([])), 400, "invalid_value"),
        (
            "unknown part type",
            user(json!([{"type": "input_audio", "input_audio": {}}])),
            400,
            "invalid_value",
        ),
        (
            "part without type",
            user(json!([{"text": "hi"}])),
            400,
            "invalid_value",
        ),
        (
            "text part not a string",
            user(json!([{"type": "text", "text": 5}])),
            400,
            "invalid_value",
        ),
        (
            "image_url without url",
            user(json!([{"type": "image_url", "image_url": {}}])),
            400,
            "invalid_value",
        ),
        (
            "invalid base64",
            with_image("data:image/png;base64,!!!not-base64!!!".into()),
            400,
            "invalid_image_url",
        ),
        (
            "unsupported media type",
            with_image(data_url("image/tiff", &png)),
            400,
            "unsupported_image_type",
        ),
        (
            "not an image",
            with_image(data_url("image/png", b"hello, I am text, not a picture")),
            400,
            "invalid_image",
        ),
        (
            "truncated PNG",
            with_image(data_url("image/png", &png[..png.len() / 2])),
            400,
            "invalid_image",
        ),
        (
            "decompression bomb",
            with_image(data_url("image/png", &bomb_png())),
            400,
            "invalid_image",
        ),
        (
            "1x1 image",
            with_image(png_data_url(1, 1)),
            400,
            "invalid_image",
        ),
        (
            "too many images",
            user(json!([
            {"type": "image_url", "image_url": {"url": good_img}},
            {"type": "image_url", "image_url": {"url": good_img}},
            {"type": "image_url", "image_url": {"url": good_img}}])),
            400,
            "too_many_images",
        ),
        (
            "remote URL while disabled",
            with_image("https://example.com/cat.png".into()),
            400,
            "remote_images_disabled",
        ),
        (
            "ftp URL",
            with_image("ftp://example.com/cat.png".into()),
            400,
            "invalid_image_url",
        ),
        (
            "image in an assistant message",
            msgs(json!([{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": good_img}}]}])),
            400,
            "invalid_value",
        ),
        (
            "prompt over the context",
            chat(&long_prompt, 2),
            400,
            "context_length_exceeded",
        ),
        (
            "max_tokens over the context",
            chat("hi", 100_000),
            400,
            "context_length_exceeded",
        ),
        ("max_tokens zero", chat("hi", 0), 400, "invalid_value"),
        (
            "max_tokens negative",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}),
            400,
            "invalid_value",
        ),
        (
            "unsupported n",
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}),
            400,
            "unsupported_parameter",
        ),
        (
            "temperature out of range",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}),
            400,
            "invalid_value",
        ),
        (
            "temperature a string",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}),
            400,
            "invalid_value",
        ),
        (
            "top_p zero",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            400,
            "invalid_value",
        ),
        (
            "top_k negative",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_k": -5}),
            400,
            "invalid_value",
        ),
        (
            "five stop strings",
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}),
            400,
            "invalid_value",
        ),
        (
            "stop a number",
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": 3}),
            400,
            "invalid_value",
        ),
        (
            "stream_options without stream",
            json!({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}),
            400,
            "invalid_value",
        ),
        (
            "tools",
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
            400,
            "unsupported_parameter",
        ),
        (
            "logprobs",
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true}),
            400,
            "unsupported_parameter",
        ),
        (
            "json_schema response_format",
            json!({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}),
            400,
            "unsupported_parameter",
        ),
        (
            "unknown model",
            json!({"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model_not_found",
        ),
        (
            "reserved marker in text",
            chat("look: <|image_pad|>", 2),
            400,
            "invalid_prompt",
        ),
    ];
    for (name, v, status, code) in &json_cases {
        cases.push((name, serde_json::to_vec(v).unwrap(), *status, code));
    }
    assert!(cases.len() >= 30);
    rt().block_on(async {
        let mut failures = Vec::new();
        for (name, body, status, code) in &cases {
            let resp = http
                .post(server.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{name}: no answer: {e}"));
            let got = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let message = v["error"]["message"].as_str().unwrap_or("");
            let ok = got == *status
                && error_code(&v) == *code
                && message.len() > 15
                && v["error"]["type"].is_string();
            if !ok {
                failures.push(format!(
                    "{name}: expected {status} {code}, got {got} {text}"
                ));
            }
            // Each one leaves the server healthy.
            let (s, _) = get(&http, &server, "/health").await;
            assert_eq!(s, 200, "after {name}");
        }
        // Wrong method and unknown route, also JSON.
        let (s, body) = get(&http, &server, "/v1/chat/completions").await;
        assert_eq!(s, 405, "{body}");
        let (s, body) = get(&http, &server, "/v1/nothing").await;
        assert_eq!(s, 404, "{body}");
        assert!(body.contains("\"error\""));
        assert!(
            failures.is_empty(),
            "{}\n--- server log ---\n{}",
            failures.join("\n"),
            server.log()
        );
        let (s, v) = post(&http, &server, &image_chat(&good_img)).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = post(&http, &server, &chat("Still there?", 3)).await;
        assert_eq!(s, 200, "{v}");
    });
}

#[test]
fn kill_switch_through_admin_route_gates_images_only() {
    let server = Server::start(
        "killswitch",
        tiny_model(),
        &["--vision-enabled", "--no-plain"],
    );
    let admin = Certs::get().http("admin");
    let user = Certs::get().http("user");
    let img = image_chat(&png_data_url(48, 48));
    rt().block_on(async {
        let (s, v) = post(&user, &server, &img).await;
        assert_eq!(s, 200, "{v}");
        // A probe asks for the tower to run again on an image it has seen.
        let resp = user
            .post(server.url("/v1/chat/completions"))
            .header("cache-control", "max-age=0, No-Cache")
            .json(&img)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);

        let resp = user
            .post(server.url("/admin/kill-switch"))
            .json(&json!({"reason": "canary says no"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);

        let resp = admin
            .post(server.url("/admin/kill-switch"))
            .json(&json!({"reason": "three breached windows"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let file: Value =
            serde_json::from_slice(&std::fs::read(&server.kill_switch).unwrap()).unwrap();
        assert_eq!(file["engaged_by"], "admin");
        assert_eq!(file["reason"], "three breached windows");

        let (s, v) = post(&user, &server, &img).await;
        assert_eq!(
            (s, error_code(&v)),
            (503, "vision_disabled_by_kill_switch"),
            "{v}"
        );
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("three breached windows"));
        let (s, v) = post(&user, &server, &chat("text still works", 3)).await;
        assert_eq!(s, 200, "{v}");
        let (_, health) = get(&user, &server, "/health").await;
        let health: Value = serde_json::from_str(&health).unwrap();
        assert_eq!(health["vision"], "disabled_by_kill_switch");
        assert_eq!(health["kill_switch"]["engaged_by"], "admin");
        let (_, metrics) = get(&user, &server, "/metrics").await;
        assert!(
            metrics.contains("cathedral_kill_switch_engaged 1"),
            "{metrics}"
        );

        let resp = admin
            .delete(server.url("/admin/kill-switch"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!server.kill_switch.exists());
        let (s, v) = post(&user, &server, &img).await;
        assert_eq!(s, 200, "{v}");

        // The file alone (as the canary or cathedralctl writes it) takes effect on the next request.
        cathedral_runtime::killswitch::KillSwitch::new(&server.kill_switch)
            .engage("canary", "written directly")
            .unwrap();
        let (s, v) = post(&user, &server, &img).await;
        assert_eq!(
            (s, error_code(&v)),
            (503, "vision_disabled_by_kill_switch"),
            "{v}"
        );
        let (_, metrics) = get(&user, &server, "/metrics").await;
        assert!(
            metrics.contains(
                r#"cathedral_http_requests_total{route="/v1/chat/completions",status="503"} 2"#
            ),
            "{metrics}"
        );
        // The same image three times: the tower ran for the first and the no-cache one;
        // the third one's features came from the cache.
        assert!(
            metrics.contains("cathedral_vision_tower_seconds_count 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"cathedral_images_total{features="tower"} 2"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"cathedral_images_total{features="cache"} 1"#),
            "{metrics}"
        );
    });
}

/// A copy of the tiny checkpoint with the vision tower and its config removed.
fn text_only_checkpoint() -> std::path::PathBuf {
    let src = tiny_model();
    let dst = support::scratch().join("text-only");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_str().unwrap();
        if name == "config.json" {
            let mut cfg: Value =
                serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
            cfg.as_object_mut().unwrap().remove("vision_config");
            std::fs::write(dst.join(name), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(entry.path()).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
                .tensors()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("vision_tower."))
                .collect();
            safetensors::serialize_to_file(kept, None, &dst.join(name)).unwrap();
        } else {
            std::fs::copy(entry.path(), dst.join(name)).unwrap();
        }
    }
    dst
}

#[test]
fn vision_gate_codes_leave_text_alone() {
    let not_wired = Server::start("notwired", tiny_model(), &["--no-plain"]);
    let text_only = Server::start(
        "textonly",
        &text_only_checkpoint(),
        &["--no-plain", "--vision-enabled"],
    );
    let user = Certs::get().http("user");
    let img = image_chat(&png_data_url(48, 48));
    rt().block_on(async {
        for (server, code, vision) in [
            (&not_wired, "vision_pipeline_not_yet_wired", "not_wired"),
            (&text_only, "vision_unsupported_backend", "unsupported"),
        ] {
            let (s, v) = post(&user, server, &img).await;
            assert_eq!((s, error_code(&v)), (503, code), "{v}\n{}", server.log());
            assert_eq!(v["error"]["type"], "server_error");
            let (s, v) = post(&user, server, &chat("plain text", 3)).await;
            assert_eq!(s, 200, "{v}");
            let (_, health) = get(&user, server, "/health").await;
            let health: Value = serde_json::from_str(&health).unwrap();
            assert_eq!(health["vision"], vision);
        }
    });
    // The text path does not depend on the vision state: same greedy answer both ways.
    let vision = Server::start(
        "vision-on",
        tiny_model(),
        &["--no-plain", "--vision-enabled"],
    );
    rt().block_on(async {
        let q = chat("Compare me", 6);
        let (_, a) = post(&user, &not_wired, &q).await;
        let (_, b) = post(&user, &vision, &q).await;
        assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
        assert_eq!(a["usage"], b["usage"]);
    });
}

/// Reads an SSE body until `[DONE]` or the end; returns the data lines.
async fn read_sse(resp: reqwest::Response, mut on_first: impl FnMut()) -> Vec<String> {
    use futures_util::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let mut first = true;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        while let Some(i) = buf.find("\n\n") {
            let ev = buf[..i].to_string();
            buf.drain(..i + 2);
            if let Some(data) = ev.strip_prefix("data: ") {
                events.push(data.to_string());
                if first {
                    first = false;
                    on_first();
                }
            }
        }
    }
    events
}

#[test]
fn sigterm_mid_stream_ends_cleanly_and_exits_zero() {
    let mut server = Server::start(
        "sigterm",
        tiny_model(),
        &[
            "--vision-enabled",
            "--plain-listen",
            "127.0.0.1:0",
            "--shutdown-grace",
            "60",
        ],
    );
    let plain = server.plain.expect("plain listener address");
    let http = Certs::get().http("user");
    let started = Instant::now();
    let events = rt().block_on(async {
        let body = json!({"messages": [{"role": "user", "content": "Tell a long story."}],
                          "max_tokens": 60, "temperature": 0, "stream": true});
        let resp = http
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        read_sse(resp, || server.sigterm()).await
    });
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    let finish = last["choices"][0]["finish_reason"].as_str().unwrap_or("");
    assert!(["stop", "length"].contains(&finish), "{events:?}");
    let status = server.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(60));
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(plain).is_err());
    assert!(std::net::TcpStream::connect(server.addr).is_err());
    assert!(server.log().contains("SIGTERM received"));
}

#[test]
fn grace_over_cuts_streams_short_and_still_exits_zero() {
    let mut server = Server::start(
        "grace",
        tiny_model(),
        &["--no-plain", "--shutdown-grace", "1"],
    );
    let http = Certs::get().http("user");
    let events = rt().block_on(async {
        let body = json!({"messages": [{"role": "user", "content": "Go on forever."}],
                          "max_tokens": 3000, "stream": true});
        let resp = http
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        read_sse(resp, || server.sigterm()).await
    });
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "server_shutting_down", "{err}");
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

#[test]
fn queue_full_429_disconnect_cancels_and_request_timeout() {
    let server = Server::start(
        "queue",
        tiny_model(),
        &[
            "--no-plain",
            "--max-concurrency",
            "1",
            "--max-queue",
            "0",
            "--request-timeout",
            "3",
        ],
    );
    let http = Certs::get().http("user");
    rt().block_on(async {
        let body = json!({"messages": [{"role": "user", "content": "Go on forever."}],
                          "max_tokens": 3000, "stream": true});
        let resp = http
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let resp2 = http
            .post(server.url("/v1/chat/completions"))
            .json(&chat("me too", 2))
            .send()
            .await
            .unwrap();
        assert_eq!(resp2.status(), 429);
        let retry: u64 = resp2.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=120).contains(&retry));
        let v: Value = resp2.json().await.unwrap();
        assert_eq!(error_code(&v), "queue_full");
        // Read a little, then hang up: the generation must stop, freeing the engine.
        use futures_util::StreamExt;
        let mut stream = resp.bytes_stream();
        let _ = stream.next().await;
        let _ = stream.next().await;
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, metrics) = get(&http, &server, "/metrics").await;
            if metrics.contains(r#"cathedral_generations_total{reason="cancelled"} 1"#) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "generation not cancelled:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, v) = post(&http, &server, &chat("my turn", 2)).await;
        assert_eq!(s, 200, "{v}");
        // A generation that cannot finish in --request-timeout is cut off with 504.
        let began = Instant::now();
        let (s, v) = post(&http, &server, &chat("again, at length", 3500)).await;
        assert_eq!((s, error_code(&v)), (504, "request_timeout"), "{v}");
        assert!(began.elapsed() < Duration::from_secs(20));
        let (_, metrics) = get(&http, &server, "/metrics").await;
        assert!(
            metrics.contains(r#"cathedral_generations_total{reason="timeout"} 1"#),
            "{metrics}"
        );
    });
}

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    use cathedral_runtime::certs::{CertAuthority, CertBundle, ServerName, Validity};
    use cathedral_runtime::client::{mtls_client, ClientTls};
    let certs = Certs::get();
    let dir = support::scratch().join("hup");
    std::fs::create_dir_all(&dir).unwrap();
    let served = CertBundle::in_dir(&dir, "server");
    std::fs::copy(&certs.server.cert, &served.cert).unwrap();
    std::fs::copy(&certs.server.key, &served.key).unwrap();
    let server = Server::start_with_cert("hup", tiny_model(), &["--no-plain"], &served);
    let old_trust = certs.http("user");
    let user = certs.client("user");
    rt().block_on(async {
        let (s, _) = get(&old_trust, &server, "/health").await;
        assert_eq!(s, 200);

        // A new server certificate from another CA replaces the files; then SIGHUP.
        let ca2 = CertAuthority::generate("rotated CA", Validity::days(2)).unwrap();
        let ca2_bundle = CertBundle::in_dir(&dir, "ca2");
        ca2.write(&ca2_bundle).unwrap();
        ca2.issue_server(
            &["localhost".parse::<ServerName>().unwrap()],
            Validity::days(2),
        )
        .unwrap()
        .write(&served)
        .unwrap();
        let pid = server.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.log().contains("TLS certificates reloaded") {
            assert!(Instant::now() < deadline, "{}", server.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The open connection still works: only a reused connection can, since a new one would
        // meet a certificate this client does not trust.
        let (s, _) = get(&old_trust, &server, "/health").await;
        assert_eq!(s, 200, "the open connection was dropped");
        let fresh_old = certs.http("user");
        assert!(fresh_old.get(server.url("/health")).send().await.is_err());
        let rotated = mtls_client(
            &ClientTls {
                ca: ca2_bundle.cert.clone(),
                cert: user.cert.clone(),
                key: user.key.clone(),
            },
            Duration::from_secs(30),
        )
        .unwrap();
        let (s, _) = get(&rotated, &server, "/health").await;
        assert_eq!(s, 200);
    });
}

/// A plain HTTP image host on 127.0.0.1 for the remote-image test: `/ok.png`, `/big.png`
/// (larger than the limit), `/slow.png` (answers after 5 s), anything else 404.
fn image_host(png: Vec<u8>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(16) {
            let Ok(mut conn) = conn else { continue };
            let png = png.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body) = match path.as_str() {
                    "/ok.png" => ("200 OK", png),
                    "/big.png" => ("200 OK", vec![0u8; 200_000]),
                    "/slow.png" => {
                        std::thread::sleep(Duration::from_secs(5));
                        ("200 OK", png)
                    }
                    _ => ("404 Not Found", b"no".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            });
        }
    });
    addr
}

#[test]
fn remote_images_only_when_allowed_and_within_limits() {
    let png = {
        use base64::Engine as _;
        let url = png_data_url(40, 40);
        base64::engine::general_purpose::STANDARD
            .decode(url.split_once(',').unwrap().1)
            .unwrap()
    };
    let host = image_host(png);
    let server = Server::start(
        "remote",
        tiny_model(),
        &[
            "--vision-enabled",
            "--no-plain",
            "--allow-remote-images",
            "--remote-image-max-bytes",
            "50000",
            "--remote-image-timeout",
            "2",
        ],
    );
    let user = Certs::get().http("user");
    rt().block_on(async {
        let url = |p: &str| format!("http://{host}{p}");
        let (s, v) = post(&user, &server, &image_chat(&url("/ok.png"))).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = post(&user, &server, &image_chat(&url("/big.png"))).await;
        assert_eq!((s, error_code(&v)), (400, "image_too_large"), "{v}");
        let began = Instant::now();
        let (s, v) = post(&user, &server, &image_chat(&url("/slow.png"))).await;
        assert_eq!((s, error_code(&v)), (400, "image_fetch_failed"), "{v}");
        assert!(began.elapsed() < Duration::from_secs(5));
        let (s, v) = post(&user, &server, &image_chat(&url("/missing.png"))).await;
        assert_eq!((s, error_code(&v)), (400, "image_fetch_failed"), "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("404"),
            "{v}"
        );
    });
}
