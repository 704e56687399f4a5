//! The server against a real engine over loopback: endpoints, streaming, errors, auth, metrics,
//! disconnects, shutdown and a bounded concurrent load.
//!
//! Each test builds its own runtime and server on port 0 and talks plain HTTP/1.1 to it over a
//! `TcpStream` from the test thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use moe_engine::EngineConfig;
use moe_model::presets::Preset;
use moe_model::synth::{write_model, SynthOptions};
use serde_json::{json, Value};

use super::audit::ThrottleConfig;
use super::autoscale::AutoscaleConfig;
use super::connections::HttpConfig;
use super::{Server, Setup, SetupConfig};
use crate::cmd::generate::PlacementArg;

const TOKEN: &str = "s3cret-token";

fn model_dir(preset: Preset) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(&preset.config(), dir.path(), &SynthOptions::new(4), |_| {}).unwrap();
    dir
}

struct Harness {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

struct Opts {
    devices: usize,
    /// Devices at the start (default: all).
    initial: Option<usize>,
    autoscale: Option<AutoscaleConfig>,
    max_queue: usize,
    admin: bool,
    run_engine: bool,
    drain: Duration,
    api_key: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            devices: 2,
            initial: None,
            autoscale: None,
            max_queue: 64,
            admin: true,
            run_engine: true,
            drain: Duration::from_secs(10),
            api_key: None,
        }
    }
}

impl Harness {
    fn new(opts: Opts) -> Harness {
        let dir = model_dir(Preset::TinyMixtral);
        let config = SetupConfig {
            max_devices: opts.devices,
            initial: opts.initial.unwrap_or(opts.devices),
            placement: PlacementArg::Balanced,
            max_queue: opts.max_queue,
            admin_token: opts.admin.then(|| TOKEN.to_string()),
            api_key: opts.api_key.clone(),
            chat_template: None,
            deployment: moe_host::deployment::DeploymentConfig::default(),
            model_id: "tiny".into(),
            engine: EngineConfig::default(),
            autoscale: opts.autoscale,
            scale_queue: 4,
            auth_throttle: ThrottleConfig::default(),
        };
        let setup = Setup::load(dir.path(), &config).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(Server::start(
                setup,
                "127.0.0.1:0".parse().unwrap(),
                opts.run_engine,
                opts.drain,
                HttpConfig::default(),
            ))
            .unwrap();
        let addr = server.addr;
        Harness {
            rt,
            server: Some(server),
            addr,
            _dir: dir,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown()).unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A response: status, lower-cased headers, de-chunked body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req.into_bytes()
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            std::str::from_utf8(&raw[..eol])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Resp {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&request_bytes(method, path, headers, body))
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    call(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        &body.to_string(),
    )
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    call(addr, "GET", path, &[], "")
}

/// Concatenated text of an SSE completion stream, and its finish reason; asserts `[DONE]` ends it.
fn stream_text(r: &Resp, chat: bool) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        r.headers
    );
    let data = r.sse();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.body
    );
    let mut text = String::new();
    let mut finish = String::new();
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let piece = if chat {
            c["delta"]["content"].as_str()
        } else {
            c["text"].as_str()
        };
        text.push_str(piece.unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

/// A sample's name and labels (without `model_name`, which every sample has), and its value.
fn parse_sample(line: &str) -> Option<(String, std::collections::BTreeMap<String, String>, &str)> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split(',')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .filter(|(k, _)| k != "model_name")
        .collect();
    Some((name.to_string(), labels, value))
}

/// The value of the sample `series` (`name` or `name{label="value",...}`, `model_name` left out;
/// trailing spaces ignored).
fn metric(text: &str, series: &str) -> f64 {
    let (name, labels, _) = parse_sample(&format!("{} 0", series.trim())).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .find(|(n, l, _)| *n == name && *l == labels)
        .and_then(|(_, _, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics:\n{text}"))
}

#[test]
fn completions_text_and_token_ids_agree_and_stream_matches() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let body = json!({"model": "tiny", "prompt": "Hi!", "max_tokens": 6, "ignore_eos": true});
    let r = post(a, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 9);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();

    // "Hi!" is bytes 72, 105, 33 in the byte-level tokenizer: the same prompt as ids.
    let ids = post(
        a,
        "/v1/completions",
        &json!({"prompt": [72, 105, 33], "max_tokens": 6, "ignore_eos": true}),
    );
    assert_eq!(ids.json()["choices"][0]["text"], text);
    let batch = post(
        a,
        "/v1/completions",
        &json!({"prompt": [[72, 105, 33]], "max_tokens": 6, "ignore_eos": true}),
    );
    assert_eq!(batch.json()["choices"][0]["text"], text);

    let s = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Hi!", "max_tokens": 6, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let (streamed, finish) = stream_text(&s, false);
    assert_eq!(
        streamed, text,
        "the stream's text equals the whole response's"
    );
    assert_eq!(finish, "length");
    let data = s.sse();
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6);
}

#[test]
fn chat_applies_the_template_and_streams_deltas() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"}]);
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 5, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // Mixtral's real template: the system message goes into the first [INST]; <s> is one
    // special token, every other byte one token.
    let rendered = "<s> [INST] Be brief.\n\nHello [/INST]";
    assert_eq!(
        v["usage"]["prompt_tokens"],
        rendered.len() - "<s>".len() + 1
    );
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let s = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 5, "ignore_eos": true, "stream": true}),
    );
    let (streamed, finish) = stream_text(&s, true);
    assert_eq!(streamed, text);
    assert_eq!(finish, "length");
    let first: Value = serde_json::from_str(&s.sse()[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
}

#[test]
fn every_bad_request_gets_a_400_with_an_openai_error_body() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let long = "x".repeat(3000);
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), None),
        ("/v1/completions", String::new(), None),
        (
            "/v1/completions",
            json!({"max_tokens": 3}).to_string(),
            None,
        ),
        (
            "/v1/completions",
            json!({"prompt": ""}).to_string(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": long}).to_string(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 0}).to_string(),
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 1_000_000}).to_string(),
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": -1}).to_string(),
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": 0.7, "top_p": 0}).to_string(),
            Some("top_p"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "n": 17}).to_string(),
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}).to_string(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 999_999]}).to_string(),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user"}]}).to_string(),
            None,
        ),
    ];
    for (path, body, param) in cases {
        let r = call(
            a,
            "POST",
            path,
            &[("content-type", "application/json")],
            &body,
        );
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}");
        }
    }
    let vocab = post(a, "/v1/completions", &json!({"prompt": [1, 999_999]}));
    assert!(vocab.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("vocabulary"));
    assert_eq!(get(a, "/v1/nothing").status, 404);
    let m = get(a, "/metrics").body;
    assert_eq!(
        metric(
            &m,
            "elasticmoe_http_requests_total{endpoint=\"completions\",code=\"400\"}"
        ),
        13.0
    );
}

#[test]
fn models_health_ready_and_metrics() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let m = get(a, "/v1/models").json();
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["max_model_len"], 2048);
    assert_eq!(get(a, "/health").status, 200);
    assert_eq!(get(a, "/ready").status, 200);
    for _ in 0..2 {
        let r = post(
            a,
            "/v1/completions",
            &json!({"prompt": "abc", "max_tokens": 4, "ignore_eos": true}),
        );
        assert_eq!(r.status, 200);
    }
    let r = get(a, "/metrics");
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let t = r.body;
    assert_eq!(
        metric(
            &t,
            "elasticmoe_http_requests_total{endpoint=\"completions\",code=\"200\"}"
        ),
        2.0
    );
    assert_eq!(metric(&t, "elasticmoe_prompt_tokens_total "), 6.0);
    assert_eq!(metric(&t, "elasticmoe_generation_tokens_total "), 8.0);
    assert_eq!(
        metric(&t, "elasticmoe_requests_finished_total{reason=\"length\"}"),
        2.0
    );
    assert_eq!(metric(&t, "elasticmoe_ttft_seconds_count "), 2.0);
    assert_eq!(metric(&t, "elasticmoe_tpot_seconds_count "), 2.0);
    assert_eq!(
        metric(&t, "elasticmoe_ttft_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert_eq!(metric(&t, "elasticmoe_active_devices "), 2.0);
    assert_eq!(metric(&t, "elasticmoe_queue_depth "), 0.0);
    assert_eq!(metric(&t, "elasticmoe_running_sequences "), 0.0);
    assert_eq!(metric(&t, "elasticmoe_kv_blocks_used{rank=\"1\"}"), 0.0);
    assert!(metric(&t, "elasticmoe_kv_blocks_capacity{rank=\"0\"}") > 0.0);
    assert_eq!(metric(&t, "elasticmoe_scale_bytes_moved_total "), 0.0);
    // OpenMetrics: the family is declared without `_total`, its samples carry it.
    assert!(t.contains("# TYPE elasticmoe_scale_events counter"));
}

#[test]
fn admin_endpoints_need_the_bearer_token() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let none = call(a, "GET", "/admin/status", &[], "");
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let basic = call(
        a,
        "GET",
        "/admin/status",
        &[("authorization", "Basic abc")],
        "",
    );
    assert_eq!(basic.status, 401);
    let wrong = call(
        a,
        "GET",
        "/admin/status",
        &[("authorization", "Bearer nope")],
        "",
    );
    assert_eq!(wrong.status, 403);
    let auth = format!("Bearer {TOKEN}");
    let ok = call(a, "GET", "/admin/status", &[("authorization", &auth)], "");
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["scale"]["active_devices"], 2);
    let scale = |body: &str, hdr: &[(&str, &str)]| call(a, "POST", "/admin/scale", hdr, body);
    assert_eq!(scale("{\"devices\": 1}", &[]).status, 401);
    assert_eq!(
        scale("{\"devices\": 1}", &[("authorization", "Bearer x")]).status,
        403
    );
    let with = [("authorization", auth.as_str())];
    for bad in [
        "{\"devices\": 0}",
        "{\"devices\": 3}",
        "{\"add\": 1}",
        "{\"remove\": 2}",
        "{\"remove\": 0}",
        "{\"devices\": -1}",
        "{\"devices\": 1, \"add\": 1}",
        "{\"grow\": 1}",
        "[1]",
        "nope",
    ] {
        let r = scale(bad, &with);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    // A valid command reaches the executor, which moves the live engine to one device and back.
    let r = scale("{\"remove\": 1}", &with);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["target_devices"], 1);
    let st = wait_scaled(a, 1);
    assert_eq!(st["scale"]["available"], true);
    assert_eq!(st["scale"]["detail"]["last"]["outcome"], "completed");
    let t = get(a, "/metrics").body;
    assert_eq!(metric(&t, "elasticmoe_active_devices "), 1.0);
    assert_eq!(
        metric(
            &t,
            "elasticmoe_scale_events_total{kind=\"down\",strategy=\"elastic\",outcome=\"completed\"}"
        ),
        1.0
    );
    let moved_down = metric(&t, "elasticmoe_scale_bytes_moved_total ");
    assert!(moved_down > 0.0, "the leaving device's experts were copied");
    // Served on one device, then back on two.
    let one = post(
        a,
        "/v1/completions",
        &json!({"prompt": "abc", "max_tokens": 4, "ignore_eos": true}),
    );
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(scale("{\"remove\": 1}", &with).status, 400, "1 - 1 = 0");
    let r = scale("{\"add\": 1}", &with);
    assert_eq!(r.status, 202, "{}", r.body);
    wait_scaled(a, 2);
    let t = get(a, "/metrics").body;
    assert_eq!(metric(&t, "elasticmoe_active_devices "), 2.0);
    assert_eq!(
        metric(
            &t,
            "elasticmoe_scale_events_total{kind=\"up\",strategy=\"elastic\",outcome=\"completed\"}"
        ),
        1.0
    );
    assert!(metric(&t, "elasticmoe_scale_bytes_moved_total ") > moved_down);
    let two = post(
        a,
        "/v1/completions",
        &json!({"prompt": "abc", "max_tokens": 4, "ignore_eos": true}),
    );
    assert_eq!(
        two.json()["choices"][0]["text"],
        one.json()["choices"][0]["text"]
    );
}

/// `/admin/status` once `active_devices` is `n` and no transition runs or waits (panics after
/// 60 s).
fn wait_scaled(a: SocketAddr, n: usize) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = call(a, "GET", "/admin/status", &[("authorization", &auth)], "").json();
        if st["scale"]["active_devices"] == n && st["scale"]["transition_running"] == false {
            return st;
        }
        assert!(Instant::now() < deadline, "never reached {n} devices: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_single_device_server_refuses_to_scale_with_503() {
    let h = Harness::new(Opts {
        devices: 1,
        ..Opts::default()
    });
    let auth = format!("Bearer {TOKEN}");
    let with = [("authorization", auth.as_str())];
    let r = call(h.addr, "POST", "/admin/scale", &with, "{\"devices\": 1}");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("single device"));
    let r = call(h.addr, "POST", "/admin/scale", &with, "{\"add\": 1}");
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn admin_endpoints_are_absent_without_a_token_file() {
    let h = Harness::new(Opts {
        admin: false,
        ..Opts::default()
    });
    let auth = format!("Bearer {TOKEN}");
    assert_eq!(
        call(
            h.addr,
            "GET",
            "/admin/status",
            &[("authorization", &auth)],
            ""
        )
        .status,
        404
    );
    assert_eq!(
        call(h.addr, "POST", "/admin/scale", &[], "{\"add\":1}").status,
        404
    );
}

#[test]
fn a_full_queue_gets_429_with_retry_after() {
    // The engine loop is not running, so the first request stays queued.
    let mut h = Harness::new(Opts {
        max_queue: 1,
        run_engine: false,
        ..Opts::default()
    });
    let a = h.addr;
    let mut first = TcpStream::connect(a).unwrap();
    let body =
        json!({"prompt": "a", "max_tokens": 2, "stream": true, "ignore_eos": true}).to_string();
    first
        .write_all(&request_bytes("POST", "/v1/completions", &[], &body))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.server().state.engine().metrics().queue_depth < 1 {
        assert!(Instant::now() < deadline, "the first request never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "b", "max_tokens": 2}),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_exceeded");
    // Once the engine runs, the queued stream completes normally.
    h.server.as_mut().unwrap().start_engine();
    first
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut raw = Vec::new();
    first.read_to_end(&mut raw).unwrap();
    let (_, finish) = stream_text(&parse(&raw), false);
    assert_eq!(finish, "length");
}

#[test]
fn a_client_that_disconnects_cancels_its_request_and_frees_its_kv() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let mut s = TcpStream::connect(a).unwrap();
    let body = json!({"prompt": "tell me a long story", "max_tokens": 2000, "stream": true,
                      "ignore_eos": true})
    .to_string();
    s.write_all(&request_bytes("POST", "/v1/completions", &[], &body))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before its first chunk");
        seen.extend_from_slice(&buf[..n]);
    }
    let engine = h.server().state.engine().clone();
    // The engine's metrics are refreshed per iteration: wait for the running sequence to show.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.metrics().running != 1 {
        assert!(Instant::now() < deadline, "{:?}", engine.metrics());
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = engine.metrics();
        let used: usize = m.kv.iter().map(|r| r.used_blocks).sum();
        if m.running == 0 && used == 0 && h.server().state.inflight_count() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {m:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = get(a, "/metrics").body;
    assert_eq!(metric(&t, "elasticmoe_client_disconnects_total "), 1.0);
    assert!(metric(&t, "elasticmoe_generation_tokens_total ") < 2000.0);
}

#[test]
fn shutdown_finishes_running_streams_and_refuses_new_ones() {
    let mut h = Harness::new(Opts::default());
    let a = h.addr;
    let body = json!({"prompt": "abc", "max_tokens": 400, "stream": true, "ignore_eos": true});
    let client = std::thread::spawn(move || post(a, "/v1/completions", &body));
    let deadline = Instant::now() + Duration::from_secs(30);
    let engine = h.server().state.engine().clone();
    while engine.metrics().generated_tokens == 0 {
        assert!(Instant::now() < deadline, "no token came");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        h.server().state.inflight_count(),
        1,
        "shut down while it runs"
    );
    let state = std::sync::Arc::clone(&h.server().state);
    let server = h.server.take().unwrap();
    let done = h.rt.spawn(server.shutdown());
    let r = client.join().unwrap();
    let (_, finish) = stream_text(&r, false);
    assert_eq!(finish, "length", "the running stream finished in full");
    h.rt.block_on(done).unwrap().unwrap();
    assert!(state
        .engine()
        .submit(moe_engine::Request::greedy(vec![1], 1))
        .is_err());
    assert!(TcpStream::connect(a).is_err() || get_refused(a));
}

/// After shutdown, a connection either fails or gets no HTTP response.
fn get_refused(a: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(a) else {
        return true;
    };
    let _ = s.write_all(&request_bytes("GET", "/health", &[], ""));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    raw.is_empty()
}

#[test]
fn shutdown_cancels_what_does_not_finish_by_the_deadline() {
    let mut h = Harness::new(Opts {
        drain: Duration::from_millis(50),
        ..Opts::default()
    });
    let a = h.addr;
    let body = json!({"prompt": "abc", "max_tokens": 2000, "stream": true, "ignore_eos": true});
    let client = std::thread::spawn(move || post(a, "/v1/completions", &body));
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.server().state.engine().metrics().generated_tokens == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    h.shutdown();
    let r = client.join().unwrap();
    let (_, finish) = stream_text(&r, false);
    assert_eq!(finish, "abort");
}

#[test]
fn concurrent_load_streams_all_finish_and_match_a_sequential_reference() {
    let h = Harness::new(Opts {
        devices: 3,
        ..Opts::default()
    });
    let a = h.addr;
    let prompts: Vec<String> = (0..12).map(|i| format!("prompt number {i}: ")).collect();
    let reference: Vec<String> = prompts
        .iter()
        .map(|p| {
            post(
                a,
                "/v1/completions",
                &json!({"prompt": p, "max_tokens": 8, "ignore_eos": true}),
            )
            .json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let started = Instant::now();
    let threads: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.clone();
            std::thread::spawn(move || {
                let body =
                    json!({"prompt": p, "max_tokens": 8, "ignore_eos": true, "stream": i % 2 == 0});
                let r = post(a, "/v1/completions", &body);
                assert!(r.status < 500, "{}", r.body);
                if i % 2 == 0 {
                    stream_text(&r, false).0
                } else {
                    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
                }
            })
        })
        .collect();
    let got: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        got, reference,
        "outputs under load equal the sequential ones"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
}

/// One finished request of a load thread: prompt index, text, when it was sent and done.
struct Done {
    prompt: usize,
    text: String,
    sent: Instant,
    done: Instant,
}

/// `threads` clients, each sending requests over `prompts` (streaming every other one) until
/// `stop` is set (after at least one request each), `cap` requests, or `limit` elapsed. Every
/// response must be a 200 and every stream must end with `[DONE]`.
fn load(
    a: SocketAddr,
    prompts: &[String],
    threads: usize,
    max_tokens: usize,
    cap: usize,
    limit: Duration,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<Done>>> {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + limit;
    (0..threads)
        .map(|t| {
            let prompts = prompts.to_vec();
            let stop = std::sync::Arc::clone(stop);
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut k = 0;
                while k < cap
                    && Instant::now() < deadline
                    && !(stop.load(Ordering::SeqCst) && k > 0)
                {
                    let prompt = (t * 7 + k) % prompts.len();
                    let stream = (t + k) % 2 == 0;
                    let body = json!({"prompt": prompts[prompt], "max_tokens": max_tokens,
                                      "ignore_eos": true, "stream": stream});
                    let sent = Instant::now();
                    let r = post(a, "/v1/completions", &body);
                    assert_eq!(r.status, 200, "{}", r.body);
                    let text = if stream {
                        stream_text(&r, false).0
                    } else {
                        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
                    };
                    out.push(Done {
                        prompt,
                        text,
                        sent,
                        done: Instant::now(),
                    });
                    k += 1;
                }
                out
            })
        })
        .collect()
}

fn admin_scale_ok(a: SocketAddr, body: &str) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let r = call(a, "POST", "/admin/scale", &[("authorization", &auth)], body);
    assert_eq!(r.status, 202, "{body}: {}", r.body);
    r.json()
}

#[test]
fn scaling_mid_load_loses_nothing_and_matches_a_deployment_that_never_scaled() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let prompts: Vec<String> = (0..8).map(|i| format!("load {i}: once upon")).collect();
    let reference: Vec<String> = {
        let fixed = Harness::new(Opts {
            devices: 1,
            admin: false,
            ..Opts::default()
        });
        prompts
            .iter()
            .map(|p| {
                let body = json!({"prompt": p, "max_tokens": 10, "ignore_eos": true});
                let r = post(fixed.addr, "/v1/completions", &body);
                assert_eq!(r.status, 200, "{}", r.body);
                r.json()["choices"][0]["text"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let h = Harness::new(Opts {
        devices: 4,
        initial: Some(2),
        ..Opts::default()
    });
    let a = h.addr;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let clients = load(a, &prompts, 4, 10, 400, Duration::from_secs(120), &stop);
    let engine = h.server().state.engine().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.metrics().generated_tokens < 20 {
        assert!(Instant::now() < deadline, "the load never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let first_scale = Instant::now();
    assert_eq!(admin_scale_ok(a, "{\"add\": 1}")["target_devices"], 3);
    std::thread::sleep(Duration::from_millis(20));
    // Queued behind the first if it still runs; relative commands count from the target.
    assert_eq!(admin_scale_ok(a, "{\"devices\": 4}")["target_devices"], 4);
    wait_scaled(a, 4);
    assert_eq!(admin_scale_ok(a, "{\"remove\": 2}")["target_devices"], 2);
    let st = wait_scaled(a, 2);
    let scaled = Instant::now();
    // Some more load on the final deployment, then stop.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let done: Vec<Done> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        stop.load(Ordering::SeqCst) && done.iter().any(|d| d.sent > scaled),
        "the load outlasted the scaling"
    );
    assert!(
        done.iter()
            .any(|d| d.sent < first_scale && d.done > first_scale),
        "some request ran across the first transition"
    );
    for d in &done {
        assert_eq!(d.text, reference[d.prompt], "prompt {}", d.prompt);
    }
    let events = st["scale"]["events"].as_array().unwrap().clone();
    let count = |kind: &str| {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["outcome"] == "completed")
            .map(|e| e["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!((count("up"), count("down")), (2, 1), "{events:?}");
    let t = get(a, "/metrics").body;
    assert_eq!(metric(&t, "elasticmoe_active_devices "), 2.0);
    assert_eq!(
        metric(
            &t,
            "elasticmoe_http_requests_total{endpoint=\"completions\",code=\"200\"}"
        ),
        done.len() as f64
    );
    assert!(!t.contains("code=\"5"), "no 5xx:\n{t}");
}

#[test]
fn autoscale_grows_under_a_burst_and_shrinks_once_it_stops() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut policy =
        scaler::SloPolicyConfig::new(Duration::from_secs(60), Duration::from_secs(60), 2);
    // Utilisation alone decides here: two sequences fill a device, and short sustain and
    // cooldown periods keep the test to seconds.
    policy.min_requests = 1_000_000;
    policy.window = Duration::from_secs(1);
    policy.sequences_per_device = 2;
    policy.utilisation_low = 0.2;
    policy.utilisation_high = 0.5;
    policy.sustain_up = Duration::from_millis(150);
    policy.sustain_down = Duration::from_millis(500);
    policy.cooldown = Duration::from_millis(300);
    let h = Harness::new(Opts {
        devices: 2,
        initial: Some(1),
        autoscale: Some(AutoscaleConfig {
            interval: Duration::from_millis(50),
            policy,
        }),
        ..Opts::default()
    });
    let a = h.addr;
    let auth = format!("Bearer {TOKEN}");
    let status = || call(a, "GET", "/admin/status", &[("authorization", &auth)], "").json();
    // Idle at the minimum: nothing happens.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(status()["scale"]["active_devices"], 1);
    assert_eq!(status()["autoscale"]["decisions"], 0);

    let prompts: Vec<String> = (0..6).map(|i| format!("burst {i}")).collect();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let clients = load(a, &prompts, 6, 24, 500, Duration::from_secs(90), &stop);
    let up = wait_scaled(a, 2);
    stop.store(true, Ordering::SeqCst);
    let served: usize = clients.into_iter().map(|c| c.join().unwrap().len()).sum();
    assert!(served >= 6);
    assert_eq!(up["autoscale"]["last"]["to"], 2, "{up}");
    assert!(up["autoscale"]["last"]["reason"]
        .as_str()
        .unwrap()
        .contains("HighUtilisation"));

    let down = wait_scaled(a, 1);
    assert_eq!(down["autoscale"]["last"]["to"], 1, "{down}");
    assert!(down["autoscale"]["last"]["reason"]
        .as_str()
        .unwrap()
        .contains("LowUtilisation"));
    assert_eq!(down["autoscale"]["decisions"], 2, "{down}");
    let t = get(a, "/metrics").body;
    assert_eq!(metric(&t, "elasticmoe_active_devices "), 1.0);
    for kind in ["up", "down"] {
        assert_eq!(
            metric(
                &t,
                &format!(
                    "elasticmoe_scale_events_total{{kind=\"{kind}\",strategy=\"elastic\",outcome=\"completed\"}}"
                )
            ),
            1.0
        );
    }
}

#[test]
fn max_queue_is_exact_under_a_concurrent_burst() {
    // The engine loop is not running, so accepted requests wait for their first token forever.
    let mut h = Harness::new(Opts {
        max_queue: 4,
        run_engine: false,
        ..Opts::default()
    });
    let a = h.addr;
    let clients: Vec<_> = (0..13)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(a).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let body = json!({"prompt": format!("p{i}"), "max_tokens": 2, "stream": true,
                                  "ignore_eos": true})
                .to_string();
                s.write_all(&request_bytes("POST", "/v1/completions", &[], &body))
                    .unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n") {
                    assert_eq!(s.read(&mut byte).unwrap(), 1);
                    head.push(byte[0]);
                }
                let status: u16 = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap();
                (status, s)
            })
        })
        .collect();
    let got: Vec<(u16, TcpStream)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let accepted = got.iter().filter(|(s, _)| *s == 200).count();
    let refused = got.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!((accepted, refused), (4, 9));
    assert_eq!(h.server().state.waiting_count(), 4);
    // Once the engine runs, the four finish and give their places back.
    h.server.as_mut().unwrap().start_engine();
    for (status, mut s) in got {
        if status != 200 {
            continue;
        }
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    }
    assert_eq!(h.server().state.waiting_count(), 0);
}

#[test]
fn unseeded_sampling_reports_a_fresh_seed_that_reproduces_the_text() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let sample = |extra: Value| {
        let mut body = json!({"prompt": "Tell", "max_tokens": 12, "ignore_eos": true,
                              "temperature": 1.5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = post(a, "/v1/completions", &body).json();
        (
            v["seed"].as_u64().unwrap_or_else(|| panic!("no seed: {v}")),
            v["choices"][0]["text"].as_str().unwrap().to_string(),
        )
    };
    let (s1, t1) = sample(json!({}));
    let (s2, _) = sample(json!({}));
    assert_ne!(s1, s2, "a fresh seed per request");
    let (s3, t3) = sample(json!({"seed": s1}));
    assert_eq!((s3, t3), (s1, t1), "the reported seed reproduces the text");
    let greedy = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Tell", "max_tokens": 2}),
    )
    .json();
    assert!(greedy.get("seed").is_none(), "{greedy}");
    let stream = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Tell", "max_tokens": 2, "temperature": 1.0, "stream": true}),
    );
    let first: Value = serde_json::from_str(&stream.sse()[0]).unwrap();
    assert!(first["seed"].is_u64(), "{first}");
}

/// Greedy text of a completion of `prompt` with `extra` fields.
fn complete(a: SocketAddr, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": 24, "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = post(a, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn stop_strings_end_the_text_before_them_streamed_or_not() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let full = complete(a, "Hello", json!({}));
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text (two characters from the 6th on).
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text:?}");
    let stop: String = chars[5..7].iter().collect();
    let at = text.find(&stop).unwrap();
    let v = complete(a, "Hello", json!({"stop": [stop.clone(), "never-there"]}));
    assert_eq!(
        v["choices"][0]["text"],
        text[..at],
        "stop {stop:?} in {text:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 24);
    let inc = complete(
        a,
        "Hello",
        json!({"stop": stop.clone(), "include_stop_str_in_output": true}),
    );
    assert_eq!(inc["choices"][0]["text"], text[..at + stop.len()]);
    let s = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 24, "ignore_eos": true, "stream": true,
                "stop": [stop.clone()]}),
    );
    let (streamed, finish) = stream_text(&s, false);
    assert_eq!(streamed, text[..at]);
    assert_eq!(finish, "stop");
    let too_many = post(
        a,
        "/v1/completions",
        &json!({"prompt": "Hello", "stop": vec!["x"; 17]}),
    );
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.json()["error"]["param"], "stop");
}

#[test]
fn n_choices_logprobs_echo_and_created() {
    let h = Harness::new(Opts::default());
    let a = h.addr;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sampled = json!({"temperature": 0.9, "seed": 11, "max_tokens": 8});
    let v = complete(
        a,
        "Hi",
        json!({"temperature": 0.9, "seed": 11, "max_tokens": 8, "n": 3}),
    );
    assert!(v["created"].as_u64().unwrap() >= before);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(v["usage"]["completion_tokens"], 24);
    // Choice i is the single request seeded with seed + i.
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let mut one = sampled.clone();
        one["seed"] = json!(11 + i);
        let single = complete(a, "Hi", one);
        assert_eq!(c["text"], single["choices"][0]["text"], "choice {i}");
    }
    // Completion logprobs: the chosen token's and the alternatives, most likely first.
    let v = complete(
        a,
        "Hi",
        json!({"max_tokens": 5, "logprobs": 2, "echo": true}),
    );
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with("Hi"));
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"][0], 2, "after the echoed prompt");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        // Keyed by token text (two byte tokens may both read as U+FFFD, as in vLLM).
        let top = top.as_object().unwrap();
        assert!((1..=2).contains(&top.len()), "{top:?}");
        assert!(lp["token_logprobs"][i].as_f64().unwrap() <= 0.0);
    }
    // Chat logprobs, streamed and not.
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
    let r = post(a, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let content = r.json()["choices"][0]["logprobs"]["content"].clone();
    assert_eq!(content.as_array().unwrap().len(), 4);
    for c in content.as_array().unwrap() {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one, and the list is in order.
        assert_eq!(c["logprob"], top[0]["logprob"]);
        assert!(top[0]["logprob"].as_f64() >= top[2]["logprob"].as_f64());
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let s = post(a, "/v1/chat/completions", &streamed);
    let with_lp = s
        .sse()
        .iter()
        .filter(|d| d.starts_with('{'))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| v["choices"][0]["logprobs"]["content"].is_array())
        .count();
    assert_eq!(with_lp, 4);
}

#[test]
fn content_parts_api_key_model_and_template_errors() {
    let h = Harness::new(Opts {
        api_key: Some("k3y".into()),
        ..Opts::default()
    });
    let a = h.addr;
    let auth = [
        ("content-type", "application/json"),
        ("authorization", "Bearer k3y"),
    ];
    let chat = |body: &Value, headers: &[(&str, &str)]| {
        call(
            a,
            "POST",
            "/v1/chat/completions",
            headers,
            &body.to_string(),
        )
    };
    // No key, a wrong key: 401; /health, /metrics open; the admin token is not the API key.
    let body = json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 3});
    let r = chat(&body, &[("content-type", "application/json")]);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = chat(&body, &[("authorization", "Bearer nope")]);
    assert_eq!(r.status, 401);
    let r = chat(&body, &[("authorization", &format!("Bearer {TOKEN}"))]);
    assert_eq!(r.status, 401);
    assert_eq!(get(a, "/health").status, 200);
    assert_eq!(get(a, "/metrics").status, 200);
    assert_eq!(
        call(
            a,
            "GET",
            "/v1/models",
            &[("authorization", "Bearer k3y")],
            ""
        )
        .status,
        200
    );
    let plain = chat(&body, &auth);
    assert_eq!(plain.status, 200, "{}", plain.body);
    // Text parts are joined with newlines: the same prompt as the joined string.
    let parts = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}], "max_tokens": 3});
    let joined = json!({"messages": [{"role": "user", "content": "Hi\nthere"}], "max_tokens": 3});
    assert_eq!(
        chat(&parts, &auth).json()["usage"],
        chat(&joined, &auth).json()["usage"]
    );
    for (bad, param) in [
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}),
            "frobnicate",
        ),
        // Mixtral's template refuses two user turns in a row: its message comes back.
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            "messages",
        ),
    ] {
        let r = chat(&bad, &auth);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], param, "{bad}");
    }
    let r = chat(
        &json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        &auth,
    );
    assert!(
        r.body.contains("conversation roles must alternate"),
        "{}",
        r.body
    );
    let r = chat(
        &json!({"model": "other", "messages": [{"role": "user", "content": "a"}]}),
        &auth,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "model");
}

#[test]
fn engine_sizing_flags_have_defaults_and_clear_range_errors() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }
    use clap::Parser as _;
    let parse = |extra: &[&str]| {
        let mut argv = vec!["serve", "--model", "m"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    };
    let c = super::engine_config(&parse(&[])).unwrap();
    assert_eq!(
        (
            c.scheduler.max_batch_tokens,
            c.scheduler.max_running_per_rank
        ),
        (256, 64)
    );
    let c = super::engine_config(&parse(&[
        "--max-num-batched-tokens",
        "512",
        "--max-num-seqs",
        "8",
    ]))
    .unwrap();
    assert_eq!(
        (
            c.scheduler.max_batch_tokens,
            c.scheduler.max_running_per_rank
        ),
        (512, 8)
    );
    for (flag, value, needle) in [
        ("--max-num-batched-tokens", "0", "between 1 and 1048576"),
        ("--max-num-seqs", "0", "between 1 and 4096"),
        ("--max-num-seqs", "5000", "between 1 and 4096"),
    ] {
        let e = super::engine_config(&parse(&[flag, value])).unwrap_err();
        assert!(e.to_string().contains(needle), "{flag} {value}: {e}");
    }
    let d = super::deployment_config(None).unwrap();
    assert_eq!(d, moe_host::deployment::DeploymentConfig::default());
    let d = super::deployment_config(Some(1000)).unwrap();
    assert_eq!(
        (d.kv_chunks, d.kv_max_chunks),
        (4, 16),
        "rounded up to whole chunks"
    );
    for bad in [0, 255, (1 << 24) + 1] {
        let e = super::deployment_config(Some(bad)).unwrap_err();
        assert!(e.to_string().contains("--kv-cache-tokens"), "{e}");
    }
}
