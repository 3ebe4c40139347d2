//! `twotower recommend`: asks a running server and prints the answer.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use server::client::ClientOptions;
use server::proto;

/// Connection flags shared by the client commands.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Server URL (`https://` needs --tls-ca).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// File holding the server's bearer token.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the server's TLS certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

impl ConnectArgs {
    pub fn options(&self) -> anyhow::Result<ClientOptions> {
        let token = match &self.auth_token_file {
            Some(p) => Some(server::client::read_token(p).context("reading --auth-token-file")?),
            None => None,
        };
        Ok(ClientOptions {
            url: self.addr.clone(),
            token,
            ca: self.tls_ca.clone(),
            timeout: Some(Duration::from_millis(self.timeout_ms)),
        })
    }
}

#[derive(Debug, Args)]
pub struct RecommendArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The user to recommend for; without it (and without history) the answer is the most
    /// popular items.
    #[arg(long)]
    user: Option<u64>,
    /// Number of items.
    #[arg(short, long, default_value_t = 10)]
    k: u32,
    /// Only items in one of these categories (repeatable).
    #[arg(long = "category")]
    include_categories: Vec<String>,
    /// No item in any of these categories (repeatable).
    #[arg(long = "exclude-category")]
    exclude_categories: Vec<String>,
    /// Also return items the user already interacted with.
    #[arg(long)]
    include_seen: bool,
    /// Print the response as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A prepared dataset (DATA_DIR) to print the user's last --history item titles from,
    /// above the recommendations (read locally, not from the server).
    #[arg(long, requires = "user")]
    history_from: Option<PathBuf>,
    /// How many of the user's most recent items to print with --history-from.
    #[arg(long, default_value_t = 5)]
    history: usize,
}

pub fn run(args: RecommendArgs) -> anyhow::Result<()> {
    let opts = args.connect.options()?;
    let request = proto::RecommendRequest {
        user_id: args.user,
        k: args.k,
        filter: Some(proto::Filter {
            include_categories: args.include_categories.clone(),
            exclude_categories: args.exclude_categories.clone(),
            exclude_item_ids: Vec::new(),
            exclude_seen: Some(!args.include_seen),
        }),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let reply = runtime.block_on(async {
        let mut client = server::client::connect(&opts).await?;
        client
            .recommend(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
    })?;
    if let (Some(data), Some(user)) = (&args.history_from, args.user) {
        let titles = recent_titles(data, user, args.history)
            .with_context(|| format!("reading user {user}'s history from {}", data.display()))?;
        outln!(
            "user {user} recently: {}",
            if titles.is_empty() {
                "(nothing)".into()
            } else {
                titles.join(" | ")
            }
        );
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&to_json(&reply))?);
    } else {
        out!("{}", table(&reply));
    }
    Ok(())
}

/// Titles of the user's `n` most recent item events in DATA_DIR, most recent first.
fn recent_titles(data: &std::path::Path, user: u64, n: usize) -> anyhow::Result<Vec<String>> {
    let layout = features::layout::DataLayout(data.to_path_buf());
    let mut events: Vec<features::Event> = Vec::new();
    for batch in features::TableReader::<features::Event>::open(&layout.events())? {
        events.extend(
            batch?
                .into_iter()
                .filter(|e| e.user_id == user && e.item_id.is_some()),
        );
    }
    let ties = features::layout::DatasetInfo::load(data)?
        .settings
        .split
        .ties;
    features::splits::sort_user_events(&mut events, ties);
    let wanted: std::collections::HashSet<u64> = events
        .iter()
        .rev()
        .take(n)
        .filter_map(|e| e.item_id)
        .collect();
    let mut titles = std::collections::HashMap::new();
    for batch in features::TableReader::<features::Item>::open(&layout.items())? {
        for item in batch? {
            if wanted.contains(&item.item_id) {
                titles.insert(item.item_id, item.title);
            }
        }
    }
    Ok(events
        .iter()
        .rev()
        .take(n)
        .filter_map(|e| titles.get(&e.item_id?).cloned())
        .collect())
}

fn to_json(r: &proto::RecommendResponse) -> serde_json::Value {
    serde_json::json!({
        "model_version": r.model_version,
        "index_version": r.index_version,
        "fallback": r.fallback,
        "items": r.items.iter().map(|i| serde_json::json!({
            "item_id": i.item_id,
            "score": i.score,
            "title": i.title,
            "categories": i.categories,
        })).collect::<Vec<_>>(),
    })
}

fn table(r: &proto::RecommendResponse) -> String {
    let mut out = format!(
        "model {}  index {}{}\n",
        r.model_version,
        r.index_version,
        if r.fallback {
            "  (no history: most popular items)"
        } else {
            ""
        }
    );
    let title_width = r
        .items
        .iter()
        .map(|i| i.title.chars().count().min(50))
        .max()
        .unwrap_or(5)
        .max(5);
    out += &format!(
        "{:>4}  {:>12}  {:>8}  {:<title_width$}  categories\n",
        "rank", "item", "score", "title"
    );
    for (rank, i) in r.items.iter().enumerate() {
        let title: String = i.title.chars().take(50).collect();
        out += &format!(
            "{:>4}  {:>12}  {:>8.4}  {:<title_width$}  {}\n",
            rank + 1,
            i.item_id,
            i.score,
            title,
            i.categories.join(", ")
        );
    }
    out
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// `twotower health`: exit status 0 when the server reports SERVING (for container health checks).
pub fn health(args: HealthArgs) -> anyhow::Result<()> {
    let opts = args.connect.options()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let serving = runtime.block_on(server::client::is_serving(&opts))?;
    if !serving {
        anyhow::bail!("{} is up but not SERVING", opts.url);
    }
    outln!("SERVING");
    Ok(())
}
