//! `elasticmoe serve` as a process: it loads a gen-model directory, prints its address, answers
//! over loopback, drains a running stream on SIGTERM and exits 0; bad arguments fail clearly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn elasticmoe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_elasticmoe"))
}

fn gen_model(dir: &std::path::Path) {
    let out = elasticmoe()
        .args(["gen-model", "--preset", "tiny-qwen3", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `serve` on port 0 and returns the child and its address (read from stdout).
fn start(model: &std::path::Path, extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = elasticmoe()
        .args(["serve", "--port", "0", "--model"])
        .arg(model)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    (status, raw)
}

/// The server's `elasticmoe_generation_tokens_total` (any labels), from `/metrics`.
fn generated_tokens(addr: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    // `elasticmoe_generation_tokens_total{model_name="..."} N` (or without labels).
    raw.lines()
        .filter(|l| {
            l.strip_prefix("elasticmoe_generation_tokens_total")
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find_map(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no generation counter in {raw}"))
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_then_drains_on_sigterm_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    gen_model(dir.path());
    let (mut child, addr) = start(dir.path(), &["--devices", "host:2", "--initial", "2"]);
    let (status, raw) = post(
        addr,
        "/v1/completions",
        r#"{"prompt": "Hello", "max_tokens": 4, "ignore_eos": true}"#,
    );
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains("\"completion_tokens\":4"), "{raw}");

    // A long stream is running when SIGTERM arrives; it must still end with [DONE].
    let stream = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            r#"{"prompt": "Hi", "max_tokens": 300, "ignore_eos": true, "stream": true}"#,
        )
    });
    // SIGTERM once the stream is generating (the first request made 4 tokens), not after a
    // sleep: on a busy machine the stream might not have reached the server yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    while generated_tokens(addr) <= 4.0 {
        assert!(Instant::now() < deadline, "the stream never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (status, raw) = stream.join().unwrap();
    assert_eq!(status, 200);
    // The body is chunked; the last event is [DONE], after the finish chunk.
    let done = raw
        .rfind("data: [DONE]")
        .expect("the stream ends with [DONE]");
    let finish = raw
        .rfind("\"finish_reason\":\"length\"")
        .expect("it ran to max_tokens");
    assert!(
        finish < done && !raw[done + "data: [DONE]".len()..].contains("data:"),
        "{raw}"
    );
    let st = wait_exit(&mut child, Duration::from_secs(60));
    assert!(st.success(), "exit status {st:?}");
}

#[test]
fn bad_arguments_fail_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = elasticmoe().arg("serve").args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let model = dir.path().to_str().unwrap();
    let e = run(&["--model", model, "--devices", "cuda:0,1"]);
    assert!(
        e.contains("not built with CUDA") || e.contains("CUDA serving is not available"),
        "{e}"
    );
    assert!(run(&["--model", model, "--devices", "tpu:2"]).contains("unknown device kind"));
    assert!(run(&["--model", "/no/such/dir"]).contains("does not exist"));
    gen_model(dir.path());
    let e = run(&["--model", model, "--devices", "host:2", "--initial", "3"]);
    assert!(e.contains("--initial 3"), "{e}");
    let e = run(&["--model", model, "--admin-token-file", "/no/such/token"]);
    assert!(e.contains("admin token file"), "{e}");
    let e = run(&["--model", model, "--max-queue", "0"]);
    assert!(e.contains("--max-queue 0"), "{e}");
    let e = run(&["--model", model, "--max-header-bytes", "100"]);
    assert!(e.contains("--max-header-bytes"), "{e}");
    let e = run(&["--model", model, "--max-connections", "100000000"]);
    assert!(e.contains("ulimit -n"), "{e}");
}
