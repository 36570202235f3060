//! `spec::parse_document` (undeclared and with every media type the module names) and
//! `ImageConfigFile::parse` + `run_config` on arbitrary bytes.
//!
//! Invariants (besides "never panics"):
//! - a declared index type only ever yields an index, a declared manifest type only a manifest,
//!   and a declared non-manifest type (config, layer, anything else) is refused;
//! - an accepted manifest has valid digests everywhere, a config no larger than `MAX_DOCUMENT` and
//!   only layer media types `Compression::from_media_type` knows; an accepted index has valid digests;
//! - what was accepted re-serializes to JSON that is accepted again, with the same content;
//! - an accepted config has `rootfs.type == "layers"`, valid diff_ids, linux/amd64 (or unset), and
//!   `run_config` keeps its lists (env, entrypoint, cmd) as they were and drops empty strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvmm::image::reference::valid_digest;
use rvmm::image::spec::{self, Compression, Document, ImageConfigFile};

const DECLARED: &[Option<&str>] = &[
    None,
    Some(""),
    Some("application/json"),
    Some(spec::OCI_MANIFEST),
    Some(spec::OCI_INDEX),
    Some(spec::DOCKER_MANIFEST),
    Some(spec::DOCKER_LIST),
    Some(spec::OCI_CONFIG),
    Some(spec::DOCKER_CONFIG),
    Some(spec::OCI_LAYER),
    Some(spec::OCI_LAYER_GZIP),
    Some(spec::OCI_LAYER_ZSTD),
    Some(spec::OCI_LAYER_NONDIST_GZIP),
    Some(spec::DOCKER_LAYER),
    Some(spec::DOCKER_LAYER_GZIP),
    Some("text/html"),
];

fn check_document(doc: &Document, declared: Option<&str>) {
    match doc {
        Document::Manifest(m) => {
            assert!(
                !matches!(declared, Some(spec::OCI_INDEX | spec::DOCKER_LIST)),
                "declared {declared:?} but got a manifest"
            );
            assert_eq!(m.schema_version, 2);
            assert!(valid_digest(&m.config.digest));
            assert!(m.config.size <= spec::MAX_DOCUMENT);
            for l in &m.layers {
                assert!(valid_digest(&l.digest));
                assert!(Compression::from_media_type(&l.media_type).is_some());
            }
        }
        Document::Index(i) => {
            assert!(
                !matches!(declared, Some(spec::OCI_MANIFEST | spec::DOCKER_MANIFEST)),
                "declared {declared:?} but got an index"
            );
            assert_eq!(i.schema_version, 2);
            for d in &i.manifests {
                assert!(valid_digest(&d.digest));
            }
            if let Some(d) = spec::select_platform(i) {
                let p = d.platform.as_ref().expect("selected without platform");
                assert!(p.os == "linux" && p.architecture == "amd64");
            }
        }
    }
}

fn round_trip(doc: &Document, declared: Option<&str>) {
    let bytes = match doc {
        Document::Manifest(m) => serde_json::to_vec(m),
        Document::Index(i) => serde_json::to_vec(i),
    }
    .expect("serialize");
    let again = spec::parse_document(&bytes, declared).unwrap_or_else(|e| {
        panic!(
            "re-serialized document is refused: {e} ({e:?})\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    match (doc, &again) {
        (Document::Manifest(a), Document::Manifest(b)) => {
            assert_eq!(a.schema_version, b.schema_version);
            assert_eq!(a.media_type, b.media_type);
            assert_eq!(a.config, b.config);
            assert_eq!(a.layers, b.layers);
        }
        (Document::Index(a), Document::Index(b)) => {
            assert_eq!(a.schema_version, b.schema_version);
            assert_eq!(a.media_type, b.media_type);
            assert_eq!(a.manifests, b.manifests);
        }
        (a, b) => panic!("kind changed on re-parse: {a:?} -> {b:?}"),
    }
}

fn check_config(c: &ImageConfigFile) {
    assert_eq!(c.rootfs.kind, "layers");
    assert!(c.rootfs.diff_ids.iter().all(|d| valid_digest(d)));
    assert!(c.os.is_empty() || c.os == "linux");
    assert!(c.architecture.is_empty() || c.architecture == "amd64");

    let run = c.run_config();
    let cc = c.config.clone().unwrap_or_default();
    assert_eq!(run.entrypoint, cc.entrypoint);
    assert_eq!(run.cmd, cc.cmd);
    assert_eq!(run.env, cc.env.unwrap_or_default());
    assert!(run.working_dir.as_deref().is_none_or(|w| !w.is_empty()));
    assert!(run.user.as_deref().is_none_or(|u| !u.is_empty()));
    assert!(run.stop_signal.as_deref().is_none_or(|s| !s.is_empty()));
    assert_eq!(
        run.exposed_ports.len(),
        cc.exposed_ports.map_or(0, |p| p.len())
    );
    assert_eq!(run.volumes.len(), cc.volumes.map_or(0, |v| v.len()));
    assert_eq!(run.labels.len(), cc.labels.map_or(0, |l| l.len()));

    let bytes = serde_json::to_vec(c).expect("serialize");
    let again = ImageConfigFile::parse(&bytes).unwrap_or_else(|e| {
        panic!(
            "re-serialized config is refused: {e} ({e:?})\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(again.run_config(), run);
    assert_eq!(again.rootfs.diff_ids, c.rootfs.diff_ids);
}

fuzz_target!(|data: &[u8]| {
    for &declared in DECLARED {
        let Ok(doc) = spec::parse_document(data, declared) else {
            continue;
        };
        let known = declared.filter(|m| !m.is_empty() && *m != "application/json");
        assert!(
            known.is_none_or(|m| spec::MANIFEST_TYPES.contains(&m)),
            "declared {declared:?} (not a manifest type) was accepted"
        );
        check_document(&doc, declared);
        round_trip(&doc, declared);
    }
    if let Ok(c) = ImageConfigFile::parse(data) {
        check_config(&c);
    }
    let _ = Compression::sniff(data);
});
