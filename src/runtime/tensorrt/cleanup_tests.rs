//! Tests of the engine cache cleanup: the pure choice of stale keys, and [`super::super::plan_on`]
//! on copies of the tiny SD 1.5 graphs in a temporary cache (no GPU: the host is given).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use super::super::{
    Component, FileStamp, HostIdentity, SessionShapes, TensorRtSettings, format_record, plan_on,
};
use super::*;

const HOST: HostIdentity<'static> = HostIdentity {
    gpu: "NVIDIA RTX A2000",
    tensorrt: "100700",
};

fn use_by(graph: &str, used: u64) -> GraphUse {
    GraphUse {
        graph: graph.into(),
        real: format!("/real{graph}").into(),
        used,
        used_at_unix_s: 1_733_000_000 + used,
    }
}

fn record(key: &str, graph: &str, used: u64) -> KeyRecord {
    KeyRecord {
        key: key.into(),
        source: Source::default().used_by(use_by(graph, used)),
    }
}

fn unet() -> GraphPaths {
    GraphPaths {
        graph: "/models/sd15/unet/model.onnx".into(),
        real: "/real/models/sd15/unet/model.onnx".into(),
    }
}

#[test]
fn stale_keeps_the_most_recently_used_of_the_same_graph() {
    let records = [
        record("aaaaaaaaaaaaaaaa", "/models/sd15/unet/model.onnx", 1),
        record("bbbbbbbbbbbbbbbb", "/models/sd15/unet/model.onnx", 7),
        record("cccccccccccccccc", "/models/sd15/unet/model.onnx", 4),
        // The current key's own earlier record.
        record("dddddddddddddddd", "/models/sd15/unet/model.onnx", 2),
        // Another graph: never counted or removed.
        record("eeeeeeeeeeeeeeee", "/models/sd15/vae_decoder/model.onnx", 0),
    ];
    let none = HashSet::new();
    let current = "dddddddddddddddd";
    let got = |keep| stale(&records, current, &unet(), keep, &none);
    let [a, b, c] = ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"];
    assert_eq!(got(0), [b, c, a], "0 keeps only the current one, like 1");
    assert_eq!(got(1), [b, c, a]);
    assert_eq!(
        got(2),
        [c, a],
        "the current one and the last used before it"
    );
    assert_eq!(got(3), [a]);
    assert!(got(4).is_empty());
    assert!(got(usize::MAX).is_empty());
    // Keys this process planned stay, without taking a place among the kept.
    let live = HashSet::from([c.to_string()]);
    assert_eq!(stale(&records, current, &unet(), 1, &live), [b, a]);
    assert_eq!(stale(&records, current, &unet(), 2, &live), [a]);
}

#[test]
fn stale_matches_either_path_and_breaks_ties_by_time_then_key() {
    let mut linked = record("aaaaaaaaaaaaaaaa", "/models/current/unet/model.onnx", 1);
    linked.source.graphs[0].real = unet().real;
    let moved = record("bbbbbbbbbbbbbbbb", "/models/sd15/unet/model.onnx", 2);
    let other = record("cccccccccccccccc", "/models/sd15-copy/unet/model.onnx", 3);
    let records = [linked, moved, other];
    let none = HashSet::new();
    assert_eq!(
        stale(&records, "ffffffffffffffff", &unet(), 1, &none),
        ["bbbbbbbbbbbbbbbb", "aaaaaaaaaaaaaaaa"],
        "the same real file, or the same path to another file, is the same graph"
    );
    // Two workers planning at once may give the same use number.
    let mut tied = [
        record("aaaaaaaaaaaaaaaa", "/models/sd15/unet/model.onnx", 5),
        record("bbbbbbbbbbbbbbbb", "/models/sd15/unet/model.onnx", 5),
    ];
    assert_eq!(
        stale(&tied, "ffffffffffffffff", &unet(), 2, &none),
        ["aaaaaaaaaaaaaaaa"]
    );
    tied[0].source.graphs[0].used_at_unix_s += 10;
    assert_eq!(
        stale(&tied, "ffffffffffffffff", &unet(), 2, &none),
        ["bbbbbbbbbbbbbbbb"]
    );
}

#[test]
fn a_shared_key_is_ranked_by_this_graphs_use_and_only_forgotten_while_shared() {
    let vae = "/models/sd15/vae_decoder/model.onnx";
    let paths = GraphPaths {
        graph: vae.into(),
        real: format!("/real{vae}").into(),
    };
    // Another model's newer use of the shared key does not make it recent for this one.
    let shared = Source::default()
        .used_by(use_by(vae, 1))
        .used_by(use_by("/models/dreamshaper/vae_decoder/model.onnx", 9));
    let records = [
        KeyRecord {
            key: "aaaaaaaaaaaaaaaa".into(),
            source: shared.clone(),
        },
        record("bbbbbbbbbbbbbbbb", vae, 5),
    ];
    assert_eq!(
        stale(&records, "cccccccccccccccc", &paths, 2, &HashSet::new()),
        ["aaaaaaaaaaaaaaaa"]
    );
    let rest = shared.without(&paths).unwrap();
    assert_eq!(
        rest.graphs,
        [use_by("/models/dreamshaper/vae_decoder/model.onnx", 9)]
    );
    assert_eq!(
        rest.without(&GraphPaths::of(Path::new("/elsewhere"))),
        Some(rest.clone())
    );
    assert_eq!(records[1].source.without(&paths), None);
    // A later use replaces the earlier one, by either path.
    let moved = GraphUse {
        graph: "/models/current/vae_decoder/model.onnx".into(),
        ..use_by(vae, 12)
    };
    let again = shared.used_by(moved.clone());
    assert_eq!(again.graphs.len(), 2);
    assert_eq!(again.last_use(&paths), Some(&moved));
    assert_eq!(
        next_use(&[KeyRecord {
            key: "a".into(),
            source: again
        }]),
        13
    );
}

#[test]
fn keys_uses_and_digest_records() {
    assert!(is_key("0123456789abcdef"));
    for name in [
        "digests",
        "0123456789ABCDEF",
        "0123456789abcde",
        "0123456789abcdeg",
    ] {
        assert!(!is_key(name), "{name}");
    }
    assert_eq!(next_use(&[]), 1);
    let records = [
        record("aaaaaaaaaaaaaaaa", "/a", 3),
        record("bbbbbbbbbbbbbbbb", "/b", 9),
    ];
    assert_eq!(next_use(&records), 10);
    let file = Path::new("/models/sd15/unet/model.onnx_data");
    let stamp = FileStamp {
        size: 1,
        mtime_ns: 2,
    };
    let text = format_record(file, stamp, &[3; 32]);
    assert_eq!(digest_record_file(&text), Some(file.to_path_buf()));
    assert_eq!(digest_record_file("something else\n1\n2\n3\n/x\n"), None);
    let short: String = text.lines().take(4).collect::<Vec<_>>().join("\n");
    assert_eq!(digest_record_file(&short), None);
}

/// A temporary model folder and engine cache.
struct Cache {
    dir: tempfile::TempDir,
    settings: TensorRtSettings,
    shapes: SessionShapes,
}

impl Cache {
    fn new(keep: usize) -> Cache {
        let dir = tempfile::tempdir().unwrap();
        let settings = TensorRtSettings {
            engine_cache_dir: Some(dir.path().join("engines")),
            engine_cache_keep: keep,
            ..TensorRtSettings::default()
        };
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sd15");
        let bundle = crate::model::ModelBundle::open(&tiny).unwrap();
        let shapes = SessionShapes::new(Component::VaeDecoder, &bundle, 77);
        Cache {
            dir,
            settings,
            shapes,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("engines")
    }

    /// Copies the tiny VAE decoder to `models/<rel>/model.onnx`, with `version` appended
    /// as an unknown protobuf field (readers skip it; the contents, and so the key, differ).
    fn graph(&self, rel: &str, version: u8) -> PathBuf {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sd15");
        let mut bytes = std::fs::read(tiny.join("vae_decoder/model.onnx")).unwrap();
        // Field 100, varint: tag 800 = 0xa0 0x06.
        bytes.extend_from_slice(&[0xa0, 0x06, version]);
        let file = self.dir.path().join("models").join(rel).join("model.onnx");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, bytes).unwrap();
        file
    }

    /// Plans `graph` as [`super::super::plan`] does on a GPU; returns its key.
    fn plan(&self, graph: &Path, planned: &Planned) -> String {
        let made = plan_on(
            graph,
            Some(&self.shapes),
            &self.settings,
            "1.32.0",
            Some(HOST),
            planned,
        )
        .unwrap();
        assert!(made.profile.is_some());
        let dir = made.engine_cache_dir.unwrap();
        assert_eq!(dir.parent(), Some(self.root().as_path()));
        // What ONNX Runtime would put there (and a folder, to remove one too).
        std::fs::write(dir.join("engine.trt"), b"engine").unwrap();
        std::fs::create_dir_all(dir.join("more")).unwrap();
        std::fs::write(dir.join("more/engine.profile"), b"profile").unwrap();
        dir.file_name().unwrap().to_str().unwrap().to_string()
    }

    fn remaining(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    fn source(&self, key: &str) -> Source {
        let text = std::fs::read(self.root().join(key).join(SOURCE_FILE)).unwrap();
        serde_json::from_slice(&text).unwrap()
    }
}

fn set<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
    names.into_iter().map(String::from).collect()
}

#[test]
fn a_changed_graph_replaces_its_engines_and_nothing_else() {
    let cache = Cache::new(1);
    let vae = cache.graph("sd15/vae_decoder", 1);
    let first = Planned::default();
    let old = cache.plan(&vae, &first);
    let source = cache.source(&old);
    assert_eq!(source.version, 1);
    assert_eq!(source.graphs.len(), 1);
    assert_eq!(source.graphs[0].graph, vae);
    assert_eq!(source.graphs[0].real, vae.canonicalize().unwrap());
    let other = cache.graph("sd21/vae_decoder", 2);
    let kept = cache.plan(&other, &first);
    assert_ne!(old, kept);
    assert_eq!(
        cache.source(&kept).graphs[0].used,
        source.graphs[0].used + 1
    );
    // Folders the cleanup does not know: no record, not a key name, a link.
    let root = cache.root();
    let unknown = "0123456789abcdef";
    std::fs::create_dir(root.join(unknown)).unwrap();
    std::fs::create_dir(root.join("notakey")).unwrap();
    std::fs::copy(
        root.join(&old).join(SOURCE_FILE),
        root.join("notakey").join(SOURCE_FILE),
    )
    .unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join(&old).join(SOURCE_FILE),
        outside.path().join(SOURCE_FILE),
    )
    .unwrap();
    let link = "fedcba9876543210";
    std::os::unix::fs::symlink(outside.path(), root.join(link)).unwrap();

    // An update while this process runs: the old engines may still be in use.
    let vae = cache.graph("sd15/vae_decoder", 2);
    let new = cache.plan(&vae, &first);
    assert_ne!(new, old);
    assert!(cache.remaining().contains(&old));

    // After a restart the old key is stale: only its folder goes.
    let second = Planned::default();
    assert_eq!(cache.plan(&vae, &second), new);
    assert_eq!(
        cache.remaining(),
        set(["digests", &new, &kept, unknown, "notakey", link])
    );
    assert!(outside.path().join(SOURCE_FILE).exists());
    assert!(root.join(&new).join("engine.trt").exists());
    assert!(root.join(&new).join(SOURCE_FILE).exists());
    // No temporary record is left behind.
    let names: Vec<_> = std::fs::read_dir(root.join(&new)).unwrap().collect();
    assert_eq!(names.len(), 3);
}

#[test]
fn keep_two_lets_the_previous_version_come_back_without_a_rebuild() {
    let cache = Cache::new(2);
    // Each plan in its own process, as after restarts.
    let plan = |version| {
        let graph = cache.graph("sd15/vae_decoder", version);
        cache.plan(&graph, &Planned::default())
    };
    let v1 = plan(1);
    let v2 = plan(2);
    assert_eq!(cache.remaining(), set(["digests", &v1, &v2]));
    // Back to v1: its engines are still there, and it becomes the most recent.
    assert_eq!(plan(1), v1);
    assert_eq!(cache.remaining(), set(["digests", &v1, &v2]));
    let v3 = plan(3);
    assert_eq!(cache.remaining(), set(["digests", &v1, &v3]));
}

#[test]
fn a_key_two_models_share_goes_when_both_have_moved_on() {
    let cache = Cache::new(1);
    let a = cache.graph("a/vae_decoder", 1);
    let b = cache.graph("b/vae_decoder", 1);
    let shared = cache.plan(&a, &Planned::default());
    assert_eq!(
        cache.plan(&b, &Planned::default()),
        shared,
        "same contents, same key"
    );
    let graphs = |key: &str| -> Vec<PathBuf> {
        let source = cache.source(key);
        source.graphs.into_iter().map(|u| u.graph).collect()
    };
    assert_eq!(graphs(&shared), [a, b.clone()]);
    // a is updated: b still uses the folder, which now lists only b.
    let a = cache.graph("a/vae_decoder", 2);
    let a2 = cache.plan(&a, &Planned::default());
    assert_eq!(cache.remaining(), set(["digests", &shared, &a2]));
    assert_eq!(graphs(&shared), [b]);
    // b is updated too: the folder goes.
    let b = cache.graph("b/vae_decoder", 3);
    let b2 = cache.plan(&b, &Planned::default());
    assert_eq!(cache.remaining(), set(["digests", &a2, &b2]));
}

#[test]
fn digest_records_of_removed_files_are_dropped() {
    let cache = Cache::new(2);
    let gone = cache.graph("old/vae_decoder", 1);
    let stays = cache.graph("new/vae_decoder", 2);
    let planned = Planned::default();
    cache.plan(&gone, &planned);
    cache.plan(&stays, &planned);
    let records = cache.root().join("digests");
    let files = || -> BTreeSet<PathBuf> {
        std::fs::read_dir(&records)
            .unwrap()
            .map(|e| {
                let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                digest_record_file(&text).unwrap()
            })
            .collect()
    };
    let real = |p: &Path| p.canonicalize().unwrap();
    assert_eq!(files(), BTreeSet::from([real(&gone), real(&stays)]));
    // Unknown files in digests/ are left alone.
    std::fs::write(records.join("notes.txt"), "kept").unwrap();
    std::fs::write(records.join("other.bin"), "kept").unwrap();
    let gone_real = real(&gone);
    std::fs::remove_dir_all(gone.parent().unwrap()).unwrap();
    cache.plan(&stays, &planned);
    std::fs::remove_file(records.join("notes.txt")).unwrap();
    std::fs::remove_file(records.join("other.bin")).unwrap();
    assert_eq!(files(), BTreeSet::from([real(&stays)]));
    assert!(!files().contains(&gone_real));
}
