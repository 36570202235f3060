//! `rvmm ps` and `rvmm rm`.

use rvmm::run::state;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Show exited runs too.
    #[arg(short, long)]
    pub all: bool,
    /// Only print IDs.
    #[arg(short, long)]
    pub quiet: bool,
    /// Only runs that match: label=KEY, label=KEY=VALUE, name=NAME, id=PREFIX (repeatable: all
    /// must match).
    #[arg(short, long, value_name = "FILTER")]
    pub filter: Vec<String>,
}

/// A `ps --filter` condition.
enum Filter {
    Label(String, Option<String>),
    Name(String),
    Id(String),
}

impl Filter {
    fn parse(s: &str) -> anyhow::Result<Filter> {
        match s.split_once('=') {
            Some(("label", kv)) if !kv.is_empty() => Ok(match kv.split_once('=') {
                Some((k, v)) => Filter::Label(k.into(), Some(v.into())),
                None => Filter::Label(kv.into(), None),
            }),
            Some(("name", n)) => Ok(Filter::Name(n.into())),
            Some(("id", i)) => Ok(Filter::Id(i.into())),
            _ => anyhow::bail!(
                "invalid filter {s:?}: rvmm knows label=KEY[=VALUE], name=NAME, id=ID"
            ),
        }
    }

    fn matches(&self, r: &state::RunState) -> bool {
        match self {
            Filter::Label(k, v) => r
                .labels
                .iter()
                .any(|(lk, lv)| lk == k && v.as_ref().is_none_or(|v| v == lv)),
            Filter::Name(n) => r.name.contains(n.as_str()),
            Filter::Id(i) => r.id.starts_with(i.as_str()),
        }
    }
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let filters = args
        .filter
        .iter()
        .map(|f| Filter::parse(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    state::gc(&global.root);
    let runs = state::list(&global.root)?;
    let shown: Vec<_> = runs
        .iter()
        .filter(|r| args.all || r.alive())
        .filter(|r| filters.iter().all(|f| f.matches(r)))
        .collect();
    if args.quiet {
        for r in shown {
            println!("{}", short_id(&r.id));
        }
        return Ok(0);
    }
    let mut rows = vec![[
        "CONTAINER ID".to_string(),
        "IMAGE".into(),
        "COMMAND".into(),
        "ISOLATION".into(),
        "STATUS".into(),
        "PORTS".into(),
        "NAMES".into(),
    ]];
    for r in shown {
        let status = match (r.status, r.exit_code) {
            (state::Status::Running, _) => match r.started_at {
                // A VM's workload has no host pid (its state says 0): say nothing rather than 0.
                Some(t) if r.pid == 0 => format!("Up {}", ago(t)),
                Some(t) => format!("Up {} (pid {})", ago(t), r.pid),
                None => "Starting".to_string(),
            },
            (_, Some(c)) => format!("Exited ({c})"),
            (state::Status::Exited, None) => "exited".to_string(),
        };
        let mut cmd = r.command.clone();
        if cmd.chars().count() > 30 {
            cmd = cmd.chars().take(29).collect::<String>() + "…";
        }
        rows.push([
            short_id(&r.id).to_string(),
            r.image.clone(),
            format!("\"{cmd}\""),
            r.isolation.as_str().to_string(),
            status,
            r.ports.join(", "),
            r.name.clone(),
        ]);
    }
    super::images::print_table(&rows);
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Stop running runs first (SIGKILL), then remove them.
    #[arg(short, long)]
    pub force: bool,
    /// Remove the runs' anonymous volumes too.
    #[arg(short, long)]
    pub volumes: bool,
    /// Runs to remove (name or ID prefix).
    #[arg(required = true)]
    pub runs: Vec<String>,
}

pub fn rm(args: RmArgs, global: &Global) -> anyhow::Result<u8> {
    state::gc(&global.root);
    let runs = state::list(&global.root)?;
    let mut failed = false;
    for want in &args.runs {
        let hit: Vec<_> = runs
            .iter()
            .filter(|r| &r.name == want || r.id.starts_with(want.as_str()))
            .collect();
        match hit.as_slice() {
            [r] if r.alive() && args.force => {
                super::lifecycle::force_stop(r);
                // A run with --rm removed itself as it ended.
                if r.dir.exists() {
                    rvmm::image::store::remove_tree(&r.dir)?;
                }
                if args.volumes {
                    rvmm::volume::remove_anonymous(&global.root, &r.volumes);
                }
                println!("{want}");
            }
            [r] if r.alive() => {
                eprintln!("rvmm: {want} is running; stop it first (or rm -f)");
                failed = true;
            }
            [r] => {
                rvmm::image::store::remove_tree(&r.dir)?;
                if args.volumes {
                    rvmm::volume::remove_anonymous(&global.root, &r.volumes);
                }
                println!("{want}");
            }
            [] => {
                eprintln!("rvmm: no such run: {want}");
                failed = true;
            }
            _ => {
                eprintln!("rvmm: {want} is ambiguous");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// "5 seconds", "3 minutes", "2 hours" since `t` (Unix seconds), as `docker ps` says it.
fn ago(t: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(t);
    let s = now.saturating_sub(t);
    match s {
        0..=1 => "1 second".into(),
        2..=59 => format!("{s} seconds"),
        60..=119 => "1 minute".into(),
        120..=3599 => format!("{} minutes", s / 60),
        3600..=7199 => "1 hour".into(),
        7200..=172_799 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// The 12-digit form of a run ID (state files are read from disk: never slice blindly).
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
