//! A real browser on the call page: Debian's headless Chromium, its fake camera and microphone
//! fed from tests/media, driven over the DevTools protocol (on a pipe, `--remote-debugging-pipe`)
//! to click Start, read the page's counters (`window.omnicallStats`) and take a screenshot of
//! the call. Checks that the model's voice played in the page and the transcript events
//! arrived, and that the server got the microphone and VP8 camera.
//!
//! The screenshot goes to target/browser_call.png; with OMNICALL_UPDATE_SCREENSHOT=1 it also
//! replaces docs/screenshot.png.

mod rtc_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use omnicall::rtc::{RtcConfig, RunningServer, ServeConfig, Server, SessionFactory};
use rtc_support::*;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium with its DevTools protocol on fds 3 (commands in) and 4 (replies out).
struct Browser {
    child: Child,
    writer: Mutex<std::io::PipeWriter>,
    pending: Arc<Mutex<HashMap<u64, Sender<Value>>>>,
    next_id: Mutex<u64>,
    profile: PathBuf,
}

impl Browser {
    fn launch(url: &str, wav: &Path, y4m: &Path) -> Self {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: scripts/setup.sh installs it (OMNICALL_WITH_BROWSER=1)"
        );
        let profile =
            std::env::temp_dir().join(format!("omnicall-chromium-{}", std::process::id()));
        std::fs::create_dir_all(&profile).unwrap();
        let (cmd_read, cmd_write) = std::io::pipe().unwrap();
        let (evt_read, evt_write) = std::io::pipe().unwrap();
        let (cmd_fd, evt_fd) = (cmd_read.as_raw_fd(), evt_write.as_raw_fd());
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-pipe",
                "--window-size=1280,860",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!(
                "--use-file-for-fake-audio-capture={}",
                wav.display()
            ))
            .arg(format!(
                "--use-file-for-fake-video-capture={}",
                y4m.display()
            ))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. The pipe ends are first
        // moved above 10 so that placing them at 3 and 4 cannot clobber one another, and dup2
        // clears close-on-exec on the copies.
        unsafe {
            command.pre_exec(move || {
                let a = libc::fcntl(cmd_fd, libc::F_DUPFD, 10);
                let b = libc::fcntl(evt_fd, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting chromium");
        drop((cmd_read, evt_write));
        let pending: Arc<Mutex<HashMap<u64, Sender<Value>>>> = Arc::default();
        let waiting = Arc::clone(&pending);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(evt_read);
            let mut buf = vec![];
            while reader.read_until(0, &mut buf).unwrap_or(0) > 0 {
                buf.pop_if(|b| *b == 0);
                if let Ok(msg) = serde_json::from_slice::<Value>(&buf)
                    && let Some(id) = msg.get("id").and_then(Value::as_u64)
                    && let Some(tx) = waiting.lock().unwrap().remove(&id)
                {
                    let _ = tx.send(msg);
                }
                buf.clear();
            }
        });
        Self {
            child,
            writer: Mutex::new(cmd_write),
            pending,
            next_id: Mutex::new(1),
            profile,
        }
    }

    /// One DevTools command; its `result`, or a panic naming the error.
    fn call(&self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = {
            let mut n = self.next_id.lock().unwrap();
            *n += 1;
            *n
        };
        let (tx, rx) = channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.writer.lock().unwrap().write_all(&bytes).unwrap();
        let reply = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no reply to {method}"));
        if let Some(err) = reply.get("error") {
            panic!("{method} failed: {err}");
        }
        reply["result"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The page's session on the browser connection.
struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl<'a> Page<'a> {
    fn attach(browser: &'a Browser, url: &str) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = loop {
            let targets = browser.call("Target.getTargets", json!({}), None);
            let found = targets["targetInfos"].as_array().and_then(|list| {
                list.iter()
                    .find(|t| {
                        t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))
                    })
                    .map(|t| t["targetId"].as_str().unwrap().to_string())
            });
            if let Some(t) = found {
                break t;
            }
            assert!(Instant::now() < deadline, "the page never opened");
            std::thread::sleep(Duration::from_millis(100));
        };
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
            None,
        );
        Self {
            browser,
            session: attached["sessionId"].as_str().unwrap().to_string(),
        }
    }

    fn eval(&self, expression: &str) -> Value {
        let r = self.browser.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            Some(&self.session),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true.
    fn wait_for(&self, expression: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.eval(expression) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {expression}; stats: {}",
                self.eval("JSON.stringify(window.omnicallStats)")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A real (trusted) mouse click in the middle of the element.
    fn click(&self, selector: &str) {
        let rect = self.eval(&format!(
            "(() => {{ const r = document.querySelector({selector:?}).getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.browser.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
                Some(&self.session),
            );
        }
    }

    fn screenshot(&self) -> Vec<u8> {
        let shot = self.browser.call(
            "Page.captureScreenshot",
            json!({"format": "png"}),
            Some(&self.session),
        );
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

/// One Chromium at a time: two at once starve each other on a small machine.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the page showed during a call: a screenshot, its counters and transcript lines.
struct PageCall {
    png: Vec<u8>,
    stats: Value,
    lines: Vec<String>,
}

/// Serves calls made by `factory`, and has Chromium call it with the fake camera and
/// microphone: answered turns, a screenshot while the next answer plays, hang up.
async fn call_from_chromium(
    factory: SessionFactory,
    answer_timeout: Duration,
) -> (RunningServer, PageCall) {
    let _one_browser = ONE_BROWSER.lock().await;
    let server = Server::start(
        ServeConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            rtc: RtcConfig {
                udp_addrs: vec!["127.0.0.1:0".into()],
                ..Default::default()
            },
            ..Default::default()
        },
        factory,
    )
    .await
    .unwrap();
    let page_url = format!("{}/", server.url());
    let shot = tokio::task::spawn_blocking(move || {
        let browser = Browser::launch(
            &page_url,
            &media("hello16k.wav"),
            &media("testsrc_96x64.y4m"),
        );
        let page = Page::attach(&browser, &page_url);
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": false}),
            Some(&page.session),
        );
        page.wait_for(
            "(() => { const v = document.getElementById('voice'); \
               return document.readyState === 'complete' && !!v && v.options.length > 0; })()",
            Duration::from_secs(30),
        );
        page.click("#start");
        page.wait_for(
            "window.omnicallStats.connectionState === 'connected'",
            Duration::from_secs(30),
        );
        page.wait_for(
            "window.omnicallStats.eventsByType.hello === 1 && \
             window.omnicallStats.videoCodec === 'video/VP8'",
            Duration::from_secs(20),
        );
        // the fake microphone loops a spoken sentence: a turn is answered with voice and text
        page.wait_for(
            "(() => { const s = window.omnicallStats; \
               return s.userTurns >= 1 && s.assistantTextDeltas >= 1 && \
                 (s.eventsByType.timings || 0) >= 1 && \
                 s.audioPacketsReceived > 100 && s.maxModelLevel > 0.05; })()",
            answer_timeout,
        );
        // the next answer playing, the transcript and the latency table filled in
        page.wait_for(
            "window.omnicallStats.userTurns >= 2 && window.omnicallStats.modelState === 'speaking'",
            answer_timeout,
        );
        std::thread::sleep(Duration::from_millis(400));
        let png = page.screenshot();
        let stats = page.eval("JSON.stringify(window.omnicallStats)");
        let transcript = page.eval(
            "Array.from(document.querySelectorAll('#transcript li')).map(li => li.textContent)",
        );
        page.click("#hangup");
        page.wait_for(
            "window.omnicallStats.connectionState === 'closed'",
            Duration::from_secs(10),
        );
        (png, stats, transcript)
    })
    .await
    .unwrap();
    let (png, stats, transcript) = shot;
    let stats: Value = serde_json::from_str(stats.as_str().unwrap()).unwrap();
    eprintln!("page stats: {stats}");
    eprintln!("transcript: {transcript}");
    assert!(stats["audioEnergy"].as_f64().unwrap() > 0.0);
    assert!(stats["errors"].as_array().unwrap().is_empty(), "{stats}");
    let lines = transcript
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect();
    // the screenshot is a real picture of the page
    let picture = image::load_from_memory(&png).expect("a PNG screenshot");
    assert_eq!((picture.width(), picture.height()), (1280, 860));
    (server, PageCall { png, stats, lines })
}

/// The call with the model: the tiny model behind the real engine answers the browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_call_plays_the_model_and_shows_the_transcript() {
    init_tracing();
    let factory = engine_factory();
    let (server, call) = call_from_chromium(factory, Duration::from_secs(120)).await;
    assert!(
        call.lines
            .iter()
            .any(|l| l.starts_with("You(") && l.contains("s of speech")),
        "{:?}",
        call.lines
    );
    assert!(
        call.lines.iter().any(|l| l.starts_with("Model")),
        "{:?}",
        call.lines
    );
    assert!(call.stats["audioPacketsReceived"].as_u64().unwrap() > 100);
    // the camera reached the Thinker: frames encoded into the answered turn's context
    assert!(
        call.stats["thinkerVideoFrames"].as_u64().unwrap() > 0,
        "no camera frame reached the Thinker: {}",
        call.stats
    );
    eventually(Duration::from_secs(20), "the hung-up call to end", || {
        server.calls().is_empty()
    })
    .await;
    server.shutdown().await.unwrap();

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(root.join("target/browser_call.png"), &call.png).unwrap();
    if std::env::var_os("OMNICALL_UPDATE_SCREENSHOT").is_some() {
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::write(root.join("docs/screenshot.png"), &call.png).unwrap();
    }
}

/// The transport's side, seen from a harness session that logs what the browser sent: the
/// microphone, the VP8 camera at its size, the session closed after hanging up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_media_reaches_the_session() {
    init_tracing();
    let (factory, logs) = harness_factory();
    let (server, call) = call_from_chromium(factory, Duration::from_secs(60)).await;
    assert!(
        call.lines.iter().any(|l| l.starts_with("ModelI heard")),
        "{:?}",
        call.lines
    );
    {
        let logs = logs.lock().unwrap();
        assert_eq!(logs.len(), 1);
        let log = logs[0].lock().unwrap();
        assert!(log.rms() > 0.01, "microphone rms {}", log.rms());
        assert!(log.turns_answered >= 1);
        assert!(log.frames.len() >= 10, "{} camera frames", log.frames.len());
        let f = log.frames.last().unwrap();
        assert_eq!((f.width, f.height), (96, 64));
        assert_eq!(log.config.as_ref().unwrap().voice, "Chelsie");
    }
    eventually(Duration::from_secs(20), "the hung-up call to end", || {
        server.calls().is_empty()
    })
    .await;
    eventually(Duration::from_secs(20), "the session to close", || {
        logs.lock().unwrap()[0].lock().unwrap().closed
    })
    .await;
    server.shutdown().await.unwrap();
}
