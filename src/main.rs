//! The omnicall command line: parses arguments and hands over to the library.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use omnicall::bench::{Measurement, markdown_table};
use omnicall::model::chat::{
    Content, Conversation, Message, Role, SamplingOverrides, sampling_options,
};
use omnicall::model::loading::{ModelFiles, config_from_spec, parse_device, parse_dtype};
use omnicall::model::omni::OmniModel;
use omnicall::model::thinker::MultimodalEmbeds;

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
    /// One text turn in, the answer streamed to stdout.
    Chat(ChatArgs),
    /// Speed measurements.
    Bench(BenchArgs),
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
    /// System prompt (default: the chat template's "You are a helpful assistant.").
    #[arg(long)]
    system: Option<String>,
    /// The user's message.
    text: String,
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
}

#[derive(Args)]
struct ModelBenchArgs {
    /// 3b, 7b, or a config.json / model folder.
    #[arg(long)]
    config: String,
    /// Stages to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "thinker")]
    stages: Vec<String>,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chat(args) => chat(args),
        Command::Bench(BenchArgs {
            what: BenchCommand::Model(args),
        }) => bench_model(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let dtype = parse_dtype(&args.model.dtype)?;
    let device = parse_device(&args.model.device)?;
    let files = ModelFiles::locate(&args.model.model)?;
    let mut model = OmniModel::load(&files, dtype, &device)?;
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
    let mut conversation = Conversation::default();
    if let Some(system) = args.system {
        conversation.push(Message::text(Role::System, system));
    }
    conversation.push(Message::new(Role::User, vec![Content::Text(args.text)]));

    let mut stdout = std::io::stdout().lock();
    let reply = model.reply(
        &conversation,
        &MultimodalEmbeds::default(),
        &options,
        |delta| {
            stdout.write_all(delta.as_bytes())?;
            stdout.flush().context("writing the answer")
        },
    )?;
    writeln!(stdout)?;
    tracing::info!(
        "{} prompt tokens, {} answer tokens ({:?})",
        reply.prompt_tokens,
        reply.ids.len(),
        reply.finish
    );
    Ok(())
}

/// Stages `omnicall bench model` can run.
const BENCH_STAGES: &[&str] = &["thinker"];

fn bench_model(args: ModelBenchArgs) -> anyhow::Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let device = parse_device(&args.device)?;
    let config = config_from_spec(&args.config)?;
    for stage in &args.stages {
        if !BENCH_STAGES.contains(&stage.as_str()) {
            bail!("unknown bench stage {stage:?}: available are {BENCH_STAGES:?}");
        }
    }
    let mut rows: Vec<Measurement> = Vec::new();
    for stage in &args.stages {
        tracing::info!("measuring {stage} ({}, {dtype:?})", args.config);
        match stage.as_str() {
            "thinker" => rows.extend(omnicall::bench::thinker::bench_thinker(
                &config, dtype, &device,
            )?),
            other => bail!("unknown bench stage {other:?}"),
        }
    }
    print!("{}", markdown_table(&rows));
    Ok(())
}
