//! `Source::parse` and `Reference::parse` on arbitrary UTF-8.
//!
//! Invariants (besides "never panics"):
//! - a parsed `Reference` is normalized: non-empty registry, valid repository, a tag or a digest,
//!   a digest is `sha256:<64 lowercase hex>`;
//! - `name()` re-parses to the same registry and repository (with the default tag `latest`);
//! - parsing is idempotent: `Display` re-parses to an equal `Reference` (see the note on length);
//! - `Source::parse` of an input without a transport prefix is exactly `Reference::parse` of it
//!   (after an optional `docker://`), and errors carry the input they were given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvmm::image::reference::{host_of, valid_digest, Reference, Source, DOCKER_HUB};

/// Longest input `Reference::parse` accepts (`"too long"` beyond it).
const MAX_INPUT: usize = 512;

fn check_reference(input: &str, r: &Reference) {
    assert!(!r.registry.is_empty(), "{input:?} -> empty registry");
    assert!(!r.repository.is_empty(), "{input:?} -> empty repository");
    assert!(
        r.repository.len() <= 255,
        "{input:?} -> repository too long"
    );
    assert!(
        r.tag.is_some() || r.digest.is_some(),
        "{input:?} -> neither tag nor digest"
    );
    if let Some(d) = &r.digest {
        assert!(valid_digest(d), "{input:?} -> bad digest {d:?}");
    }
    if let Some(t) = &r.tag {
        assert!(
            !t.is_empty() && t.len() <= 128 && !t.contains(['/', ':', '@']),
            "{input:?} -> bad tag {t:?}"
        );
    }
    assert!(
        !["index.docker.io", "registry-1.docker.io"].contains(&r.registry.as_str()),
        "{input:?} -> registry alias not normalized"
    );
    if r.registry == DOCKER_HUB {
        assert!(
            r.repository.contains('/'),
            "{input:?} -> Docker Hub name without namespace"
        );
    }
    let _ = r.is_loopback();
    let _ = host_of(&r.registry);

    // name() round-trips.
    let name = r.name();
    let again = Reference::parse(&name)
        .unwrap_or_else(|e| panic!("{input:?} -> name {name:?} does not re-parse: {e}"));
    assert_eq!(again.registry, r.registry, "{input:?} -> name {name:?}");
    assert_eq!(again.repository, r.repository, "{input:?} -> name {name:?}");
    assert_eq!(again.tag.as_deref(), Some("latest"), "{input:?}");
    assert_eq!(again.digest, None, "{input:?}");
    assert_eq!(again.name(), name);

    // Display round-trips exactly (the 255-character name limit keeps every normalized form
    // under the input limit).
    let shown = r.to_string();
    assert!(shown.len() <= MAX_INPUT, "{input:?} -> {shown:?} is too long");
    match Reference::parse(&shown) {
        Ok(back) => assert_eq!(&back, r, "{input:?} -> {shown:?} re-parses differently"),
        Err(e) => panic!("{input:?} -> {shown:?} does not re-parse: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };

    let reference = Reference::parse(input);
    match &reference {
        Ok(r) => {
            assert!(input.len() <= MAX_INPUT);
            check_reference(input, r);
        }
        Err(e) => assert_eq!(e.input, input),
    }

    let source = Source::parse(input);
    if let Err(e) = &source {
        assert_eq!(e.input, input);
    }
    let transport = ["oci:", "oci-archive:", "docker-archive:"]
        .iter()
        .any(|p| input.starts_with(p));
    if transport {
        match source {
            Ok(Source::OciLayout { path, tag }) | Ok(Source::OciArchive { path, tag }) => {
                assert!(!path.as_os_str().is_empty(), "{input:?}");
                if let Some(t) = tag {
                    assert!(!t.is_empty() && !t.contains('/'), "{input:?} -> tag {t:?}");
                }
            }
            Ok(Source::DockerArchive { path, name }) => {
                assert!(!path.as_os_str().is_empty(), "{input:?}");
                assert!(name.is_none_or(|n| !n.is_empty()), "{input:?}");
            }
            Ok(Source::Registry(_)) => panic!("{input:?} has a transport prefix"),
            Err(_) => {}
        }
    } else {
        let plain = input.strip_prefix("docker://").unwrap_or(input);
        match (source, Reference::parse(plain)) {
            (Ok(Source::Registry(a)), Ok(b)) => assert_eq!(a, b, "{input:?}"),
            (Err(a), Err(b)) => assert_eq!(a.reason, b.reason, "{input:?}"),
            (a, b) => panic!("{input:?}: Source {a:?} but Reference {b:?}"),
        }
    }
});
