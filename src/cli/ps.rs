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
        "NAMES".into(),
    ]];
    for r in shown {
        let status = match (r.status, r.exit_code) {
            (state::Status::Running, _) => format!("Up (pid {})", r.pid),
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
            r.name.clone(),
        ]);
    }
    super::images::print_table(&rows);
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Runs (name or ID prefix).
    #[arg(required = true)]
    pub runs: Vec<String>,
}

/// `rvmm inspect`: a JSON array, one object per run, with Docker's key names where they exist.
pub fn inspect(args: InspectArgs, global: &Global) -> anyhow::Result<u8> {
    state::gc(&global.root);
    let runs = state::list(&global.root)?;
    let mut out = Vec::new();
    let mut failed = false;
    for want in &args.runs {
        let hit: Vec<_> = runs
            .iter()
            .filter(|r| &r.name == want || r.id.starts_with(want.as_str()))
            .collect();
        let [r] = hit.as_slice() else {
            eprintln!(
                "rvmm: {}: {want}",
                if hit.is_empty() {
                    "no such run"
                } else {
                    "ambiguous"
                }
            );
            failed = true;
            continue;
        };
        let labels: serde_json::Map<String, serde_json::Value> = r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        out.push(serde_json::json!({
            "Id": r.id,
            "Name": r.name,
            "Image": r.image,
            "Isolation": r.isolation.as_str(),
            "State": {
                "Status": if r.alive() { "running" } else { "exited" },
                "Pid": r.pid,
                "ExitCode": r.exit_code,
            },
            "Config": {
                "Cmd": r.command,
                "Labels": labels,
                "StopSignal": rvmm::runspec::signal_name(r.stop_signal),
                "StopTimeout": r.stop_timeout,
            },
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(if failed { 1 } else { 0 })
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
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
            [r] if r.alive() => {
                eprintln!("rvmm: {want} is running; stop it first");
                failed = true;
            }
            [r] => {
                rvmm::image::store::remove_tree(&r.dir)?;
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

/// The 12-digit form of a run ID (state files are read from disk: never slice blindly).
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
