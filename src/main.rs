//! The omnicall command line: parses arguments and hands over to the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use omnicall::bench::peak::MachinePeak;
use omnicall::bench::{Measurement, markdown_table_against};
use omnicall::engine::blocks::BlockConfig;
use omnicall::engine::clock::{Clock, SystemClock};
use omnicall::engine::scheduler::{Scheduler, SchedulerConfig, SchedulerModels};
use omnicall::engine::session::ModelPasses;
use omnicall::media::audio_file::{WavFormat, write_wav};
use omnicall::media::offline::MediaPreparer;
use omnicall::media::video::DEFAULT_FPS;
use omnicall::model::chat::{
    Content, Conversation, Message, Role, SPEECH_SYSTEM_PROMPT, SamplingOverrides, sampling_options,
};
use omnicall::model::config::ProcessorConfig;
use omnicall::model::loading::{
    ModelFamily, ModelFiles, config_from_spec, parse_device, parse_dtype,
};
use omnicall::model::omni::OmniModel;
use omnicall::model::pipeline::{MediaInput, SpeechOptions};
use omnicall::model::sampling::SamplingOptions;
use omnicall::model::speakers::DEFAULT_VOICE;
use omnicall::model::talker::TalkerOptions;
use omnicall::model::token2wav::dit::SamplerOptions;

/// jemalloc rather than glibc's malloc: with calls starting and ending, glibc's per-thread arenas
/// kept the server's RSS wherever its busiest moment had left the heap; jemalloc's size classes
/// fragment less, and a finished call's pages are purged (`engine::threads::ReleaseMemoryOnExit`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (tikv-jemallocator's documented way to set them;
/// the environment's `_RJEM_MALLOC_CONF` still overrides). Freed pages are never returned to the
/// system on a timer: the model's passes free and reallocate tensors of the same sizes every
/// layer, and with the default decay the pages went back and faulted in again (~15 % of a bf16
/// vision block's time in page faults; that block -38 % without the decay, peak RSS at 3B bf16
/// +10 %). A server returns them when a call ends (`engine::threads::ReleaseMemoryOnExit` purges
/// every arena).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

#[derive(Parser)]
#[command(
    name = "omnicall",
    version,
    about = "Realtime voice and video calls with Qwen2.5-Omni"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One turn: text with audio, images and videos from files in, the answer streamed to
    /// stdout, and with --speak spoken into a WAV file.
    Chat(Box<ChatArgs>),
    /// Serve the browser video call: the page and WebRTC calls, each with its own session.
    Serve(Box<ServeCommand>),
    /// A call from this machine: microphone, speaker and camera, or WAV files in their place.
    Local(Box<LocalCommand>),
    /// Speed measurements.
    Bench(Box<BenchArgs>),
    /// Parity with the reference, stage by stage, on a golden fixture folder: a table of each
    /// comparison (max abs diff, tolerance, pass); exits non-zero on any failure.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// A fixture folder (cases.safetensors, cases.json, model/), as made by
    /// tests/fixtures/reference/gen_reference.py (Qwen2.5-Omni) or
    /// scripts/gen_reference_qwen3_omni.py (Qwen3-Omni); the family, and so the stages, come
    /// from model/config.json's model_type.
    #[arg(long, value_name = "DIR")]
    reference: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype of the Thinker, its encoders and the Talker: f32 or bf16 (token2wav runs in f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[command(flatten)]
    kernels: KernelsArg,
    /// Stages to run, comma-separated (default: all of the fixtures' family).
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
}

/// Which kernels the model's products use.
#[derive(Args)]
struct KernelsArg {
    /// auto (the CPU bf16 decode kernel where it applies) or generic (candle's device-generic
    /// products everywhere: what CUDA runs).
    #[arg(long, env = "OMNICALL_KERNELS", default_value = "auto")]
    kernels: omnicall::model::linear::Kernels,
    /// dense (the Linear weights in the model's dtype) or q8 (int8 Q8_0 blocks for the
    /// Thinker, its encoders and the Talker; CPU only; token2wav stays f32).
    #[arg(long, env = "OMNICALL_WEIGHTS", default_value = "dense")]
    weights: omnicall::model::linear::WeightFormat,
}

impl KernelsArg {
    fn apply(&self) {
        let chosen = omnicall::model::linear::set_kernels(self.kernels);
        let weights = omnicall::model::linear::set_weight_format(self.weights);
        tracing::debug!("kernels: {chosen:?}, weights: {weights:?}");
    }
}

/// Where the model comes from and how it runs.
#[derive(Args)]
struct ModelArgs {
    /// A model folder, or a Hugging Face hub id (e.g. Qwen/Qwen2.5-Omni-3B) in the local cache.
    #[arg(long)]
    model: String,
    /// Weight dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    kernels: KernelsArg,
}

#[derive(Args)]
struct ServeCommand {
    #[command(flatten)]
    model: ModelArgs,
    /// Random weights of a published config's shapes instead of a checkpoint: --model is then
    /// 3b, 7b or a config.json (speed measurements; the model babbles).
    #[arg(long)]
    random_weights: bool,
    /// Where the calls' Thinker and Talker passes run: `shared`, one scheduler thread for the
    /// loaded model that batches every call's decode steps; `per-call`, each call on its own
    /// threads. The encoders and the vocoder run per call either way.
    #[arg(long, value_enum, default_value_t = ModelScheduler::Shared)]
    model_scheduler: ModelScheduler,
    #[command(flatten)]
    serve: omnicall::rtc::cli::ServeArgs,
}

/// `serve --model-scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ModelScheduler {
    Shared,
    PerCall,
}

#[derive(Args)]
struct LocalCommand {
    /// A model folder or hub id (not needed with --list-devices).
    #[arg(long, required_unless_present = "list_devices")]
    model: Option<String>,
    /// Weight dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    kernels: KernelsArg,
    #[command(flatten)]
    local: omnicall::local::cli::LocalArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Most tokens of the answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature; 0 or unset decodes greedily (unless the model's generation config
    /// samples).
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens reaching this probability when sampling.
    #[arg(long)]
    top_p: Option<f64>,
    /// Penalty on tokens already in the context (1 = off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// System prompt (default: the chat template's "You are a helpful assistant.", or with
    /// --speak the speech system prompt the model needs to talk).
    #[arg(long)]
    system: Option<String>,
    /// An audio file (WAV, FLAC, MP3, OGG, or an MP4's sound track) to put in the message;
    /// repeatable. Media keep their command-line order in the message, before the text.
    #[arg(long, value_name = "FILE")]
    audio: Vec<PathBuf>,
    /// A PNG or JPEG image to put in the message; repeatable.
    #[arg(long, value_name = "FILE")]
    image: Vec<PathBuf>,
    /// A video: an MP4 (H.264) file, or a folder of PNG/JPEG frames (file-name order, taken
    /// as frames at --fps); repeatable.
    #[arg(long, value_name = "FILE|DIR")]
    video: Vec<PathBuf>,
    /// Interleave each video's sound track (the MP4's audio) with its frames.
    #[arg(long, requires = "video")]
    use_audio_in_video: bool,
    /// Frames per second videos are sampled at (the model was trained at 2); the frame rate
    /// of a folder of frames.
    #[arg(long, default_value_t = DEFAULT_FPS)]
    fps: f64,
    /// Also speak the answer: write it as a 24 kHz WAV file here.
    #[arg(long, value_name = "OUT.wav")]
    speak: Option<PathBuf>,
    /// The voice of the spoken answer (the checkpoint's voices: Chelsie, Ethan).
    #[arg(long, default_value = DEFAULT_VOICE, requires = "speak")]
    voice: String,
    /// Most codec tokens of the spoken answer (50 per second; the reference's limit is 4096).
    #[arg(long, default_value_t = 4096, requires = "speak")]
    max_speech_tokens: usize,
    /// The user's message.
    text: String,
}

/// A media file of the message and where it stood on the command line.
enum MediaArg {
    Audio(PathBuf),
    Image(PathBuf),
    Video(PathBuf),
}

impl ChatArgs {
    /// The media files in the order they were given (each kind's flags are collected
    /// separately; their positions among all arguments restore the order).
    fn media_in_order(&self, matches: Option<&ArgMatches>) -> Vec<MediaArg> {
        let mut items: Vec<(usize, MediaArg)> = Vec::new();
        let position = |id: &str, k: usize| -> usize {
            matches
                .and_then(|m| m.indices_of(id))
                .and_then(|mut i| i.nth(k))
                .unwrap_or(usize::MAX)
        };
        for (k, p) in self.audio.iter().enumerate() {
            items.push((position("audio", k), MediaArg::Audio(p.clone())));
        }
        for (k, p) in self.image.iter().enumerate() {
            items.push((position("image", k), MediaArg::Image(p.clone())));
        }
        for (k, p) in self.video.iter().enumerate() {
            items.push((position("video", k), MediaArg::Video(p.clone())));
        }
        items.sort_by_key(|(at, _)| *at);
        items.into_iter().map(|(_, m)| m).collect()
    }
}

#[derive(Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Per-stage model speed at full size with random weights (no checkpoint needed).
    Model(ModelBenchArgs),
    /// Call a running `omnicall serve` as a headless browser would and measure each turn's
    /// latency (voice to voice, every stage, barge-in).
    Call(omnicall::bench::call::CallArgs),
    /// Many headless callers against one running server: turns answered, voice to voice,
    /// refusals, dropped media, the server's CPU and memory, per number of calls; or a soak.
    Load(omnicall::bench::load::LoadArgs),
    /// Draw a `bench call` CSV as a PNG.
    Plot(omnicall::bench::plot::PlotArgs),
    /// The turn-taking models on the spoken turn set: Smart Turn's time per call, the VAD's
    /// CPU, Smart Turn's probability at each silence, and end-of-turn policies' false
    /// cut-offs and endpointing delays.
    Turn(omnicall::bench::turn::TurnBenchArgs),
}

#[derive(Args)]
struct ModelBenchArgs {
    /// 3b, 7b, qwen3-omni (the 30B-A3B shapes: speech-out stages only), or a config.json /
    /// model folder of either family (only its config is read).
    #[arg(long)]
    config: String,
    /// Stages to measure, comma-separated: thinker, audio, vision, speech, batched (Thinker
    /// and Talker decode tokens/s summed over 1, 2, 4, 8 sessions batched in one pass),
    /// engine-input, engine (end of turn to first audio frame through the real engine, by
    /// stage).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "thinker,audio,vision,speech,batched,engine-input,engine"
    )]
    stages: Vec<String>,
    /// Random weights of the config's shapes (always: no checkpoint is read).
    #[arg(long)]
    random_weights: bool,
    /// f32 or bf16 (token2wav always runs in f32, as the reference does).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed turns of the engine stage (each in a fresh session; medians and p90 reported).
    #[arg(long, default_value_t = 1)]
    turns: usize,
    /// Also measure the KV cache growth over a call of this many seconds with a 640x480
    /// camera and spoken answers (engine stage; 0: not measured).
    #[arg(long, default_value_t = 0)]
    call_seconds: u64,
    /// Length of the engine stage's overhead call (the session threads' CPU outside the model
    /// per second of call); default 60 s for test-sized models, not measured at full size.
    #[arg(long)]
    overhead_seconds: Option<u64>,
    #[command(flatten)]
    kernels: KernelsArg,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,symphonia=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // SAFETY: nothing but this thread runs yet (the CLI is parsed, no runtime is started).
    unsafe {
        omnicall::engine::threads::settle_compute_threads(matches!(cli.command, Command::Serve(_)))
    };
    let result = match cli.command {
        Command::Chat(args) => chat(*args, matches.subcommand_matches("chat")),
        Command::Serve(args) => serve(*args),
        Command::Local(args) => local(*args),
        Command::Bench(bench) => match bench.what {
            BenchCommand::Model(args) => bench_model(args),
            BenchCommand::Call(args) => omnicall::bench::call::main(args),
            BenchCommand::Load(args) => omnicall::bench::load::main(args),
            BenchCommand::Plot(args) => omnicall::bench::plot::main(args),
            BenchCommand::Turn(args) => omnicall::bench::turn::main(args),
        },
        Command::Check(args) => check(args),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, leaving out a cause whose text the message before it
/// already shows (many errors print their source themselves).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn load_model(model: &str, dtype: &str, device: &str) -> anyhow::Result<OmniModel> {
    let dtype = parse_dtype(dtype)?;
    let device = parse_device(device)?;
    let files = ModelFiles::locate(model)?;
    OmniModel::load(&files, dtype, &device)
}

/// The voices of a model that speaks (none: it answers in text only).
fn voice_names(model: &OmniModel) -> Vec<String> {
    model
        .speech
        .as_ref()
        .map(|speech| {
            speech
                .voices
                .names()
                .into_iter()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn serve(args: ServeCommand) -> anyhow::Result<()> {
    args.model.kernels.apply();
    let model = if args.random_weights {
        let config = config_from_spec(&args.model.model)?;
        tracing::info!("random weights of {}'s shapes", args.model.model);
        omnicall::bench::engine::random_model_with(
            &config,
            parse_dtype(&args.model.dtype)?,
            &parse_device(&args.model.device)?,
            true,
        )
        .context("building the random model")?
    } else {
        load_model(&args.model.model, &args.model.dtype, &args.model.device)?
    };
    let voices = voice_names(&model);
    let mut shared_scheduler = None;
    let passes = match args.model_scheduler {
        ModelScheduler::PerCall => ModelPasses::OwnClone,
        ModelScheduler::Shared => {
            // One scheduler beside the loaded model, on the server's clock (each call's
            // deadlines are converted to it).
            let models = SchedulerModels::of(&model)?;
            let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
            let scheduler = Arc::new(
                Scheduler::spawn(models, clock, SchedulerConfig::default())
                    .context("starting the model scheduler")?,
            );
            shared_scheduler = Some(scheduler.clone());
            ModelPasses::Shared(scheduler)
        }
    };
    // Every call gets its own session on the shared weights; its clock starts with the call,
    // which is media time 0 for the transport.
    let factory: omnicall::rtc::SessionFactory = Arc::new(move |mut config| {
        config.model_passes = passes.clone();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        omnicall::engine::runtime::spawn(&model, config, clock)
    });
    omnicall::rtc::cli::main(&args.serve, voices, shared_scheduler, factory)
}

fn local(args: LocalCommand) -> anyhow::Result<()> {
    if args.local.list_devices {
        print!("{}", omnicall::local::list_devices());
        return Ok(());
    }
    args.kernels.apply();
    let model = load_model(
        args.model
            .as_deref()
            .context("--model is needed for a call")?,
        &args.dtype,
        &args.device,
    )?;
    let factory: omnicall::local::SessionFactory =
        Arc::new(move |config, clock| omnicall::engine::runtime::spawn(&model, config, clock));
    omnicall::local::cli::main(&args.local, factory)
}

fn chat(args: ChatArgs, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
    if let Some(out) = &args.speak {
        check_writable(out)?;
    }
    args.model.kernels.apply();
    let files = ModelFiles::locate(&args.model.model)?;
    if files.family()? == ModelFamily::Qwen3Omni {
        return chat_qwen3(args, matches, &files);
    }
    let mut model = load_model(&args.model.model, &args.model.dtype, &args.model.device)?;
    if args.speak.is_some() {
        // Fail before any work: a checkpoint without a Talker, an unknown voice.
        model.speech()?.voices.get(&args.voice)?;
    }

    let preparer = MediaPreparer::new(&model.processor, args.fps)?;
    let mut items: Vec<MediaInput> = Vec::new();
    for media in args.media_in_order(matches) {
        items.push(match media {
            MediaArg::Audio(path) => preparer.audio_file(&path)?,
            MediaArg::Image(path) => preparer.image_file(&path)?,
            MediaArg::Video(path) => preparer.video_file(&path, args.use_audio_in_video)?,
        });
    }
    let encoded = model.encode_media(&items)?;

    let sampling = sampling_options(
        &model.generation,
        &SamplingOverrides {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
    );
    let options = model.generation_options(args.max_tokens, sampling);
    let system = match (&args.system, &args.speak) {
        (Some(system), Some(_)) if system != SPEECH_SYSTEM_PROMPT => {
            tracing::warn!(
                "a system prompt other than the speech system prompt was given: the spoken                  answer may not work as expected"
            );
            Some(system.clone())
        }
        (None, Some(_)) => Some(SPEECH_SYSTEM_PROMPT.to_string()),
        (system, _) => system.clone(),
    };
    let mut conversation = Conversation::default();
    if let Some(system) = system {
        conversation.push(Message::text(Role::System, system));
    }
    let mut content = encoded.content;
    content.push(Content::Text(args.text.clone()));
    conversation.push(Message::new(Role::User, content));

    let mut stdout = std::io::stdout().lock();
    let answer = model.answer(&conversation, &encoded.embeds, &options, |delta| {
        stdout.write_all(delta.as_bytes())?;
        stdout.flush().context("writing the answer")
    })?;
    writeln!(stdout)?;
    stdout.flush()?;
    tracing::info!(
        "{} prompt tokens, {} answer tokens ({:?})",
        answer.reply.prompt_tokens,
        answer.reply.ids.len(),
        answer.reply.finish
    );

    let Some(out) = &args.speak else {
        return Ok(());
    };
    let dit_num_embeds = model.config.token2wav_config.dit_config.num_embeds;
    let mut talker = TalkerOptions::reference(args.seed, dit_num_embeds);
    talker.max_codes = args.max_speech_tokens;
    if args.temperature == Some(0.0) {
        // The reference's talker_do_sample=False: greedy, its other settings kept.
        talker.sampling = SamplingOptions {
            repetition_penalty: talker.sampling.repetition_penalty,
            seed: args.seed,
            ..SamplingOptions::greedy()
        };
    }
    let spoken = model.speak(
        &answer,
        &SpeechOptions {
            voice: args.voice.clone(),
            talker,
            sampler: SamplerOptions::default(),
            noise_seed: args.seed,
        },
    )?;
    if spoken.waveform.is_empty() {
        eprintln!(
            "no speech: the Talker produced no codec tokens ({:?}); {} not written",
            spoken.finish,
            out.display()
        );
        return Ok(());
    }
    write_wav(out, &spoken.waveform, spoken.sample_rate, WavFormat::Pcm16)?;
    eprintln!(
        "wrote {}: {} speech tokens ({:?}), {} samples at {} Hz ({:.2} s)",
        out.display(),
        spoken.codes.len(),
        spoken.finish,
        spoken.waveform.len(),
        spoken.sample_rate,
        spoken.waveform.len() as f64 / spoken.sample_rate as f64
    );
    Ok(())
}

/// `chat` with a Qwen3-Omni model: the same media flags; the answer printed once complete; with
/// --speak each 80 ms frame rendered as soon as its codes exist.
fn chat_qwen3(
    args: ChatArgs,
    matches: Option<&ArgMatches>,
    files: &ModelFiles,
) -> anyhow::Result<()> {
    use omnicall::model::qwen3_omni::pipeline::{Qwen3Omni, SAMPLE_RATE};
    let dtype = parse_dtype(&args.model.dtype)?;
    let device = parse_device(&args.model.device)?;
    let mut model = Qwen3Omni::load(files, dtype, &device)?;
    if args.speak.is_some() && model.speech.is_none() {
        bail!("{} has no Talker: it cannot --speak", files.dir.display());
    }
    let preparer = MediaPreparer::new(&model.processor, args.fps)?;
    let mut items: Vec<MediaInput> = Vec::new();
    for media in args.media_in_order(matches) {
        items.push(match media {
            MediaArg::Audio(path) => preparer.audio_file(&path)?,
            MediaArg::Image(path) => preparer.image_file(&path)?,
            MediaArg::Video(path) => preparer.video_file(&path, args.use_audio_in_video)?,
        });
    }
    let prompt = model.prompt(args.system.as_deref(), &items, &args.text)?;
    let sampling = sampling_options(
        &model.generation,
        &SamplingOverrides {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
    );
    let answer = model.answer(&prompt, args.max_tokens, sampling)?;
    println!("{}", answer.text);
    tracing::info!(
        "{} prompt tokens, {} answer tokens",
        answer.answer.prompt_len,
        answer.answer.sequence.len() - answer.answer.prompt_len
    );
    let Some(out) = &args.speak else {
        return Ok(());
    };
    // The reference's generate: sampling at temperature 0.9, top-k 50, repetition penalty 1.05;
    // --temperature 0 is its talker_do_sample=False (greedy, the penalty kept).
    let talker = if args.temperature == Some(0.0) {
        SamplingOptions {
            repetition_penalty: 1.05,
            seed: args.seed,
            ..SamplingOptions::greedy()
        }
    } else {
        SamplingOptions {
            temperature: 0.9,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.05,
            seed: args.seed,
        }
    };
    let started = std::time::Instant::now();
    let mut first_audio = None;
    let spoken = model.speak(
        &answer.answer,
        &prompt.layout,
        &args.voice,
        args.max_speech_tokens,
        talker,
        |samples| {
            if first_audio.is_none() && !samples.is_empty() {
                first_audio = Some(started.elapsed());
            }
            Ok(())
        },
    )?;
    if spoken.waveform.is_empty() {
        eprintln!(
            "no speech: the Talker produced no frame; {} not written",
            out.display()
        );
        return Ok(());
    }
    write_wav(out, &spoken.waveform, SAMPLE_RATE, WavFormat::Pcm16)?;
    eprintln!(
        "wrote {}: {} frames ({}), {} samples at {SAMPLE_RATE} Hz ({:.2} s); first audio {:.0} ms after the answer",
        out.display(),
        spoken.frames.len(),
        if spoken.finished {
            "end of speech"
        } else {
            "frame limit"
        },
        spoken.waveform.len(),
        spoken.waveform.len() as f64 / SAMPLE_RATE as f64,
        first_audio.unwrap_or_default().as_secs_f64() * 1e3
    );
    Ok(())
}

/// An output file's folder must exist (checked before the model runs, not after).
fn check_writable(out: &std::path::Path) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write {}: folder {} does not exist",
            out.display(),
            dir.display()
        );
    }
    if out.is_dir() {
        bail!("cannot write {}: it is a folder", out.display());
    }
    Ok(())
}

/// Stages `omnicall bench model` can run.
const BENCH_STAGES: &[&str] = &[
    "thinker",
    "audio",
    "vision",
    "speech",
    "batched",
    "engine-input",
    "engine",
];

/// Seconds of simulated call the engine-input stage runs.
const ENGINE_INPUT_SECONDS: u64 = 60;

fn check(args: CheckArgs) -> anyhow::Result<()> {
    args.kernels.apply();
    let options = omnicall::check::CheckOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        weights: omnicall::model::linear::weight_format(),
    };
    let fixtures = omnicall::check::Fixtures::open(&args.reference)?;
    let stages: Vec<&str> = args.stages.iter().map(String::as_str).collect();
    let mut report = omnicall::check::Report::default();
    let started = std::time::Instant::now();
    let names = if stages.is_empty() {
        omnicall::check::stages_of(fixtures.family()?).to_vec()
    } else {
        stages
    };
    for name in names {
        let t = std::time::Instant::now();
        let rows = omnicall::check::run_stage(&fixtures, &options, name);
        let failed = rows.iter().filter(|r| !r.pass).count();
        eprintln!(
            "{name}: {} comparisons, {failed} failed ({:.1} s)",
            rows.len(),
            t.elapsed().as_secs_f64()
        );
        report.rows.extend(rows);
    }
    println!(
        "parity with {} on {} in {:?}, weights {:?}, kernels {:?}\n",
        args.reference.display(),
        args.device,
        options.dtype,
        options.weights,
        omnicall::model::linear::kernels()
    );
    print!("{}", report.table());
    let failures = report.failures().count();
    println!(
        "\n{} comparisons, {failures} failed, {:.1} s",
        report.rows.len(),
        started.elapsed().as_secs_f64()
    );
    if !report.passed() {
        for row in report.failures() {
            eprintln!("FAIL {}: {}", row.stage, row.message);
        }
        bail!("{failures} of {} comparisons failed", report.rows.len());
    }
    Ok(())
}

/// `bench model` for Qwen3-Omni: the speech-out stages (the 30B-A3B Thinker does not fit
/// this machine class's memory).
fn bench_qwen3(
    config: &omnicall::model::qwen3_omni::config::Config,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> anyhow::Result<()> {
    eprintln!(
        "qwen3-omni: measuring the Talker, the code predictor and Code2Wav; the Thinker \
         (30B-A3B, about 61 GB in bf16) is not run on random weights here"
    );
    let rows =
        omnicall::bench::qwen3_omni::bench_qwen3_speech(config, dtype, device, Default::default())?;
    print!("{}", markdown_table_against(&rows, None));
    Ok(())
}

fn bench_model(args: ModelBenchArgs) -> anyhow::Result<()> {
    args.kernels.apply();
    let dtype = parse_dtype(&args.dtype)?;
    let device = parse_device(&args.device)?;
    if let Some(config) = omnicall::bench::qwen3_omni::qwen3_config_from_spec(&args.config)? {
        return bench_qwen3(&config, dtype, &device);
    }
    let config = config_from_spec(&args.config)?;
    for stage in &args.stages {
        if !BENCH_STAGES.contains(&stage.as_str()) {
            bail!("unknown bench stage {stage:?}: available are {BENCH_STAGES:?}");
        }
    }
    if !args.random_weights {
        tracing::info!("bench model always runs on random weights of the config's shapes");
    }
    // The limits every stage's rate is read against: the probe measures the CPU's cores, so
    // only a CPU run has them.
    let peak = device
        .is_cpu()
        .then(|| MachinePeak::measure(candle_core::utils::get_num_threads()));
    if let Some(peak) = &peak {
        println!("{}", peak.describe());
    }
    let mut rows: Vec<Measurement> = Vec::new();
    for stage in &args.stages {
        tracing::info!("measuring {stage} ({}, {dtype:?})", args.config);
        let measured = match stage.as_str() {
            "thinker" => omnicall::bench::thinker::bench_thinker(&config, dtype, &device),
            "audio" => omnicall::bench::audio::bench_audio(&config, dtype, &device),
            "vision" => omnicall::bench::vision::bench_vision(&config, dtype, &device),
            "speech" => omnicall::bench::speech::bench_speech(&config, dtype, &device),
            "batched" => omnicall::bench::batched::bench_batched(&config, dtype, &device),
            "engine-input" => BlockConfig::for_model(
                &config.thinker_config,
                &ProcessorConfig::default(),
                DEFAULT_FPS,
            )
            .context("engine blocks of this config")
            .and_then(|blocks| {
                omnicall::bench::engine::input_stage_cost(&blocks, ENGINE_INPUT_SECONDS)
            }),
            "engine" => {
                let defaults = omnicall::bench::engine::EngineBenchSizes::for_config(&config);
                let seconds = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
                let sizes = omnicall::bench::engine::EngineBenchSizes {
                    turns: args.turns,
                    kv_call: seconds(args.call_seconds),
                    overhead_call: args
                        .overhead_seconds
                        .map_or(defaults.overhead_call, seconds),
                    ..defaults
                };
                omnicall::bench::engine::bench_engine_with(&config, dtype, &device, sizes)
            }
            other => bail!("unknown bench stage {other:?}"),
        };
        rows.extend(measured.with_context(|| format!("bench stage {stage}"))?);
    }
    print!("{}", markdown_table_against(&rows, peak.as_ref()));
    Ok(())
}
