//! `rvmm images`, `rvmm rmi`, `rvmm image inspect|ls|rm|tag|save|prune`.

use rvmm::image::{store::short, Reference, Store};

use super::Global;

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only print image IDs.
    #[arg(short, long)]
    pub quiet: bool,
    /// Show full digests.
    #[arg(long)]
    pub no_trunc: bool,
}

#[derive(clap::Args, Debug)]
pub struct RmiArgs {
    /// Images to remove (name, name@digest or ID).
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Print an image's config (and identity) as JSON.
    Inspect {
        /// The image: name, name@digest or ID.
        image: String,
    },
    /// List images (same as `rvmm images`).
    Ls(ListArgs),
    /// Remove images (same as `rvmm rmi`).
    Rm(RmiArgs),
    /// Give an image another name (same as `rvmm tag`).
    Tag(super::tag::Args),
    /// Write images to an archive (same as `rvmm save`).
    Save(super::save::Args),
    /// Remove blobs and layers no image uses.
    Prune,
}

pub fn list(args: ListArgs, global: &Global) -> anyhow::Result<u8> {
    let store = Store::open(&global.root)?;
    let mut images = store.images()?;
    images.sort_by_key(|i| std::cmp::Reverse(i.added));
    if args.quiet {
        for i in &images {
            println!(
                "{}",
                if args.no_trunc {
                    i.id.as_str()
                } else {
                    short(&i.id)
                }
            );
        }
        return Ok(0);
    }
    let mut rows = vec![[
        "REPOSITORY".to_string(),
        "TAG".into(),
        "IMAGE ID".into(),
        "DIGEST".into(),
        "CREATED".into(),
        "SIZE".into(),
    ]];
    for i in &images {
        let id = if args.no_trunc {
            i.id.clone()
        } else {
            short(&i.id).to_string()
        };
        let created = i
            .created
            .as_deref()
            .map(ago)
            .unwrap_or_else(|| "unknown".into());
        let size = super::pull::human_size(i.size);
        let names: Vec<(String, String)> = if i.names.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            i.names
                .iter()
                .map(|n| match Reference::parse(n) {
                    Ok(r) => (r.name(), r.tag.unwrap_or_else(|| "<none>".into())),
                    Err(_) => (n.clone(), "<none>".into()),
                })
                .collect()
        };
        for (repo, tag) in names {
            let d = i.digest_for(&format!("{repo}:{tag}"));
            let digest = if args.no_trunc {
                d.to_string()
            } else {
                format!("sha256:{}", short(d))
            };
            rows.push([repo, tag, id.clone(), digest, created.clone(), size.clone()]);
        }
    }
    print_table(&rows);
    Ok(0)
}

pub fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut w = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<width$}   ", width = w[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// RFC 3339 time → "3 days ago".
fn ago(rfc3339: &str) -> String {
    let Some(t) = parse_rfc3339(rfc3339) else {
        return rfc3339.to_string();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - t).max(0);
    let (n, unit) = match s {
        0..60 => (s, "second"),
        60..3600 => (s / 60, "minute"),
        3600..86400 => (s / 3600, "hour"),
        86400..2_592_000 => (s / 86400, "day"),
        2_592_000..31_536_000 => (s / 2_592_000, "month"),
        _ => (s / 31_536_000, "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = days * 86400 + h * 3600 + mi * 60 + se;
    let tz = s[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(off) = tz.strip_prefix('+').or_else(|| tz.strip_prefix('-')) {
        let sign = if tz.starts_with('+') { 1 } else { -1 };
        let oh = off.get(0..2)?.parse::<i64>().ok()?;
        let om = off.get(3..5)?.parse::<i64>().ok()?;
        t -= sign * (oh * 3600 + om * 60);
    }
    Some(t)
}

pub fn rmi(args: RmiArgs, global: &Global) -> anyhow::Result<u8> {
    let store = Store::open(&global.root)?;
    let mut failed = false;
    for img in &args.images {
        match store.remove(img) {
            Ok(out) => {
                for n in &out.untagged {
                    println!("Untagged: {n}");
                }
                if let Some(id) = &out.deleted {
                    println!("Deleted: {id}");
                }
                if out.layers_kept {
                    eprintln!("rvmm: some layers are in use by running workloads; `rvmm gc` removes them later");
                }
            }
            Err(e) => {
                // Through anyhow so `{:#}` prints the causes too (a store::Error alone would not).
                eprintln!("rvmm: {:#}", anyhow::Error::from(e));
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

pub fn image(cmd: ImageCommand, global: &Global) -> anyhow::Result<u8> {
    match cmd {
        ImageCommand::Inspect { image } => {
            let store = Store::open(&global.root)?;
            let rec = store
                .find(&image)?
                .ok_or_else(|| anyhow::anyhow!("no such image: {image}"))?;
            let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&rec.id)?)?;
            let out = serde_json::json!({
                "Id": rec.id,
                "Digest": rec.manifest_digest,
                "RepoTags": rec.names,
                "RepoDigests": rec.repo_digests,
                "Size": rec.size,
                "Layers": rec.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>(),
                "Created": config.get("created"),
                "Architecture": config.get("architecture"),
                "Os": config.get("os"),
                "Config": config.get("config"),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(0)
        }
        ImageCommand::Ls(a) => list(a, global),
        ImageCommand::Rm(a) => rmi(a, global),
        ImageCommand::Tag(a) => super::tag::exec(a, global),
        ImageCommand::Save(a) => super::save::exec(a, global),
        ImageCommand::Prune => {
            let store = Store::open(&global.root)?;
            if !store.gc()? {
                eprintln!("rvmm: layers in use by running workloads were kept");
            }
            Ok(0)
        }
    }
}
