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
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    state::gc(&global.root);
    let runs = state::list(&global.root)?;
    let shown: Vec<_> = runs.iter().filter(|r| args.all || r.alive()).collect();
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
