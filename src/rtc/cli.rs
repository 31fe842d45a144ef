//! The `omnicall serve` command line: its flags ([`ServeArgs`], a clap `Args` to flatten into
//! the binary's CLI) and the command's main, which serves calls until ctrl-c. The model and
//! the engine come in through the session factory, so this layer never reaches into them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::engine::scheduler::Scheduler;
use crate::engine::session::{ReplyMode, SessionConfig};
use crate::engine::turn::TurnTakingArgs;
use crate::rtc::admission::Capacity;
use crate::rtc::peer::{IceServer, RtcConfig};
use crate::rtc::server::{ServeConfig, SessionFactory, serve};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTP server (the page and the signaling). Loopback by default; bound
    /// elsewhere, set --token.
    #[arg(
        long,
        visible_alias = "listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub bind: SocketAddr,
    /// Bearer token that signaling requests must carry (`Authorization: Bearer TOKEN`).
    #[arg(long, env = "OMNICALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Calls at once; the next caller gets `503 Service Unavailable`.
    #[arg(long, default_value_t = 4)]
    pub max_calls: usize,
    /// Cores the server may use for calls (default: every core it may run on). A new call is
    /// refused with `503` and `Retry-After` when the measured load plus one more call would
    /// exceed `--capacity-cores × --max-load`.
    #[arg(long, value_name = "CORES")]
    pub capacity_cores: Option<f64>,
    /// Share of the capacity the calls may keep busy (0..1].
    #[arg(long, default_value_t = 0.85)]
    pub max_load: f64,
    /// Admit calls by --max-calls only, not by measured capacity.
    #[arg(long)]
    pub no_admission: bool,
    /// Serve the page from this folder (e.g. web/ while editing it) instead of the copy built
    /// into the binary.
    #[arg(long, value_name = "DIR")]
    pub web_root: Option<PathBuf>,
    /// STUN or TURN server URL offered to the peers (stun:host:port, turn:host:port); repeatable.
    #[arg(long = "ice-server", value_name = "URL")]
    pub ice_servers: Vec<String>,
    /// User name for the TURN servers.
    #[arg(long, default_value = "")]
    pub turn_username: String,
    /// Credential for the TURN servers.
    #[arg(
        long,
        env = "OMNICALL_TURN_CREDENTIAL",
        hide_env_values = true,
        default_value = ""
    )]
    pub turn_credential: String,
    /// Local UDP address to gather ICE host candidates on; repeatable. 0.0.0.0:0 stands for
    /// every LAN interface [default: 0.0.0.0:0 and 127.0.0.1:0]
    #[arg(long = "udp", value_name = "ADDR")]
    pub udp_addrs: Vec<String>,
    /// Largest camera picture decoded, in pixels.
    #[arg(long, value_name = "PIXELS")]
    pub max_video_pixels: Option<usize>,
    /// The default voice of a call (a caller may pick another one).
    #[arg(long)]
    pub voice: Option<String>,
    /// Replace the system prompt (the default one is what the model needs to speak).
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Answer with text only by default (a caller may switch).
    #[arg(long)]
    pub text_only: bool,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_answer_tokens: usize,
    /// Most tokens a call's context may hold; beyond it the oldest video goes first.
    #[arg(long, value_name = "TOKENS")]
    pub max_context: Option<usize>,
    /// Seed of the model's sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub turn_taking: TurnTakingArgs,
}

impl ServeArgs {
    /// The server's settings. `voices` are the model's (none: text replies only).
    pub fn serve_config(&self, voices: Vec<String>) -> anyhow::Result<ServeConfig> {
        let mut config = ServeConfig {
            bind: self.bind,
            token: self.token.clone().filter(|t| !t.is_empty()),
            web_root: self.web_root.clone(),
            ..ServeConfig::default()
        };
        if self.max_calls == 0 {
            bail!("--max-calls must be at least 1");
        }
        config.max_calls = self.max_calls;
        if !(self.max_load > 0.0 && self.max_load <= 1.0) {
            bail!("--max-load must lie in (0, 1], got {}", self.max_load);
        }
        if let Some(cores) = self.capacity_cores
            && !(cores.is_finite() && cores > 0.0)
        {
            bail!("--capacity-cores must be a positive number, got {cores}");
        }
        config.capacity = (!self.no_admission).then(|| {
            let machine = Capacity::of_machine();
            Capacity {
                cores: self.capacity_cores.unwrap_or(machine.cores),
                max_load: self.max_load,
            }
        });
        if let Some(pixels) = self.max_video_pixels {
            if pixels == 0 {
                bail!("--max-video-pixels must be at least 1");
            }
            config.max_video_pixels = pixels;
        }
        config.rtc = RtcConfig {
            udp_addrs: if self.udp_addrs.is_empty() {
                RtcConfig::default().udp_addrs
            } else {
                self.udp_addrs.clone()
            },
            ice_servers: ice_servers(
                &self.ice_servers,
                &self.turn_username,
                &self.turn_credential,
            )?,
            ..RtcConfig::default()
        };

        let mut session = SessionConfig::default();
        if let Some(prompt) = &self.system_prompt {
            session.system_prompt = prompt.clone();
        }
        session.reply_mode = if self.text_only || voices.is_empty() {
            ReplyMode::Text
        } else {
            ReplyMode::Voice
        };
        session.max_answer_tokens = self.max_answer_tokens;
        if let Some(max_context) = self.max_context {
            session.max_context = max_context;
        }
        session.seed = self.seed;
        self.turn_taking.apply(&mut session.turn, &mut session.vad);
        match &self.voice {
            Some(voice) if !voices.contains(voice) => bail!(
                "no voice {voice:?} in this model; its voices: {}",
                if voices.is_empty() {
                    "none (it has no Talker)".to_string()
                } else {
                    voices.join(", ")
                }
            ),
            Some(voice) => session.voice = voice.clone(),
            None => {
                if let Some(first) = voices.first().filter(|_| !voices.contains(&session.voice)) {
                    session.voice = first.clone();
                }
            }
        }
        config.session = session;
        config.voices = voices;
        Ok(config)
    }
}

fn ice_servers(
    urls: &[String],
    username: &str,
    credential: &str,
) -> anyhow::Result<Vec<IceServer>> {
    urls.iter()
        .map(|url| {
            let scheme = url.split(':').next().unwrap_or_default();
            match scheme {
                "stun" | "stuns" => Ok(IceServer {
                    urls: vec![url.clone()],
                    username: String::new(),
                    credential: String::new(),
                }),
                "turn" | "turns" => {
                    if username.is_empty() || credential.is_empty() {
                        bail!("TURN server {url} needs --turn-username and --turn-credential");
                    }
                    Ok(IceServer {
                        urls: vec![url.clone()],
                        username: username.to_string(),
                        credential: credential.to_string(),
                    })
                }
                _ => bail!("ICE server {url:?} is neither a stun: nor a turn: URL"),
            }
        })
        .collect()
}

/// `omnicall serve`: serves calls until ctrl-c.
/// `model_scheduler`: the scheduler the factory's sessions share, if they do.
pub fn main(
    args: &ServeArgs,
    voices: Vec<String>,
    model_scheduler: Option<Arc<Scheduler>>,
    factory: SessionFactory,
) -> anyhow::Result<()> {
    // (the server itself warns when it listens beyond loopback without a token)
    let mut config = args.serve_config(voices)?;
    config.model_scheduler = model_scheduler;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    runtime.block_on(serve(config, factory))?;
    // Calls still hanging up get a moment to end their sessions.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<ServeArgs> {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        Ok(Cli::try_parse_from(all)?.serve)
    }

    fn voices() -> Vec<String> {
        vec!["Chelsie".into(), "Ethan".into()]
    }

    #[test]
    fn defaults_serve_loopback_with_voice_replies() {
        let config = parse(&[]).unwrap().serve_config(voices()).unwrap();
        assert_eq!(config.bind, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(config.session.reply_mode, ReplyMode::Voice);
        assert_eq!(config.session.voice, "Chelsie");
        assert!(config.token.is_none());
        assert!(config.rtc.ice_servers.is_empty());
    }

    #[test]
    fn a_model_without_voices_answers_in_text() {
        let config = parse(&[]).unwrap().serve_config(vec![]).unwrap();
        assert_eq!(config.session.reply_mode, ReplyMode::Text);
    }

    #[test]
    fn listen_is_an_alias_of_bind_and_flags_reach_the_session() {
        let args = parse(&[
            "--listen",
            "0.0.0.0:9000",
            "--token",
            "secret",
            "--voice",
            "Ethan",
            "--text-only",
            "--max-context",
            "4096",
            "--ice-server",
            "stun:stun.example.org:3478",
        ])
        .unwrap();
        let config = args.serve_config(voices()).unwrap();
        assert_eq!(config.bind.port(), 9000);
        assert_eq!(config.token.as_deref(), Some("secret"));
        assert_eq!(config.session.voice, "Ethan");
        assert_eq!(config.session.reply_mode, ReplyMode::Text);
        assert_eq!(config.session.max_context, 4096);
        assert_eq!(
            config.rtc.ice_servers[0].urls,
            ["stun:stun.example.org:3478"]
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let err = parse(&["--voice", "Nobody"])
            .unwrap()
            .serve_config(voices());
        assert!(format!("{:#}", err.unwrap_err()).contains("Chelsie, Ethan"));
        let err = parse(&["--ice-server", "turn:t.example.org"])
            .unwrap()
            .serve_config(voices());
        assert!(format!("{:#}", err.unwrap_err()).contains("--turn-username"));
        let err = parse(&["--ice-server", "http://x"])
            .unwrap()
            .serve_config(voices());
        assert!(format!("{:#}", err.unwrap_err()).contains("neither"));
        let err = parse(&["--max-calls", "0"]).unwrap().serve_config(voices());
        assert!(format!("{:#}", err.unwrap_err()).contains("--max-calls"));
        assert!(parse(&["--bind", "not-an-address"]).is_err());
    }
}
