//! `omnicall serve` as a user starts it: the binary on the tiny checkpoint (or random weights of
//! its shapes) serves the page and `/v1/info` on loopback, stops on Ctrl-C (SIGINT), and
//! refuses bad settings with a message naming them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

/// Starts the server on a free port; returns it and its page's URL (from its log line).
fn start(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .arg("serve")
        .arg("--model")
        .arg(tiny())
        .args(["--bind", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting omnicall serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("call page on ").nth(1) {
                let _ = tx.send(url.trim().trim_end_matches('/').to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server said where its page is");
    (child, url)
}

fn stop(mut child: Child) {
    let pid = child.id() as i32;
    // SAFETY: signalling a child process we own and have not reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "serve ended with {status} after Ctrl-C");
            return;
        }
        assert!(Instant::now() < deadline, "serve did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_answers_with_the_page_and_its_info_and_stops_on_ctrl_c() {
    let (child, url) = start(&["--voice", "Ethan"]);
    let page = ureq::get(&format!("{url}/"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("<html"), "{page}");
    let info: serde_json::Value = ureq::get(&format!("{url}/v1/info"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(info["voice"], "Ethan");
    assert_eq!(info["voices"], serde_json::json!(["Chelsie", "Ethan"]));
    // a broken offer is refused with the reason, and the server goes on
    let refused = ureq::post(&format!("{url}/v1/offer"))
        .set("Content-Type", "application/sdp")
        .send_string("v=0\r\nthis is not an offer\r\n");
    match refused {
        Err(ureq::Error::Status(400, response)) => {
            let reason = response.into_string().unwrap();
            assert!(!reason.trim().is_empty());
        }
        other => panic!("a broken offer got {other:?}"),
    }
    assert!(ureq::get(&format!("{url}/v1/info")).call().is_ok());
    stop(child);
}

#[test]
fn serve_runs_on_random_weights_of_a_configs_shapes() {
    let (child, url) = start(&["--random-weights"]);
    let info: serde_json::Value = ureq::get(&format!("{url}/v1/info"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(info["reply_mode"], "voice");
    assert_eq!(info["voices"].as_array().unwrap().len(), 1);
    stop(child);
}

#[test]
fn serve_runs_with_either_model_scheduler() {
    for scheduler in ["shared", "per-call"] {
        let (child, url) = start(&["--model-scheduler", scheduler]);
        let info: serde_json::Value = ureq::get(&format!("{url}/v1/info"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(
            info["voices"],
            serde_json::json!(["Chelsie", "Ethan"]),
            "{scheduler}"
        );
        // a shared scheduler's thread ends with the server
        stop(child);
    }
}

/// `serve` with these arguments: it must fail; returns what it said.
fn refused(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_omnicall"))
        .arg("serve")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_refuses_bad_settings_naming_them() {
    let tiny = tiny();
    let with_tiny = |more: &[&str]| {
        let mut args = vec!["--model".as_ref(), tiny.as_os_str()];
        args.extend(more.iter().map(std::ffi::OsStr::new));
        refused(&args)
    };
    let stderr = with_tiny(&["--bind", "127.0.0.1:0", "--voice", "Nobody"]);
    assert!(
        stderr.contains("Nobody") && stderr.contains("Chelsie, Ethan"),
        "{stderr}"
    );
    let stderr = with_tiny(&["--model-scheduler", "everywhere"]);
    assert!(
        stderr.contains("everywhere") && stderr.contains("shared, per-call"),
        "{stderr}"
    );
    let stderr = refused(&["--model".as_ref(), "/nonexistent/model".as_ref()]);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}
