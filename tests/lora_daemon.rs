//! LoRA support end to end, with the real ONNX Runtime, the tiny SD 1.5 model and the
//! committed LoRA fixtures (tests/golden/lora/loras/):
//! - a daemon on a private bus serving two clients whose requests alternate between two
//!   LoRA sets and no LoRA gives each request the pixels `diffusionctl generate --local
//!   --lora` gives it alone (each set is its own loaded model, listed in `ListModels`'
//!   `lora_sets`); the time to a first request of a new set and to a repeated one, and
//!   the daemon's RSS before and after two sets are loaded, are printed;
//! - `ListLoras` describes every file of the LoRA folders (size, A1111 hash, whether it
//!   fits the model and why not) and sees files added while the daemon runs, as does a
//!   request naming one;
//! - bad `loras` values and `<lora:...>` tags are refused naming the key and the LoRA; a
//!   LoRA that does not fit the model fails its job, and the daemon goes on serving;
//! - A1111's `<lora:NAME:WEIGHT>` prompt tags give the pixels of the `loras` key, and the
//!   PNG records `Lora hashes`;
//! - a daemon batch applies the LoRAs a manifest line names, and sees files added while
//!   the daemon runs, as its requests do.
//!
//! The same through `diffusionctl` without a daemon: tests/lora_cli.rs.

mod common;

use common::lora::*;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Daemon, PrivateBus, ctl_command, error_name, generate, png_rgb, result_pngs, rss_kb,
    tokio_runtime, wait,
};
use zbus::zvariant::{OwnedValue, Value};

#[test]
fn two_clients_alternating_lora_sets_get_the_images_of_generate_local() {
    let folder = lora_folder(&["sd15_kohya", "sd15_peft"]);
    let bus = PrivateBus::start();
    let daemon = daemon_with_model_folder(&bus, folder.path());
    let prompt = "a lighthouse on a cliff at dusk";
    let seed = 4242;
    let set_a: LoraSet<'_> = &[("sd15_kohya", 0.8)];
    let set_b: LoraSet<'_> = &[("sd15_kohya", 0.5), ("sd15_peft", -1.0)];
    // Set B with its LoRAs in the other order: the same set.
    let set_b_reversed: LoraSet<'_> = &[("sd15_peft", -1.0), ("sd15_kohya", 0.5)];

    // What each request gives alone, from the command line.
    let refs = tempfile::tempdir().unwrap();
    let want_plain = generate_local(&refs.path().join("plain.png"), prompt, seed, &[]);
    let want_a = generate_local(
        &refs.path().join("a.png"),
        prompt,
        seed,
        &[(fixture("sd15_kohya"), 0.8)],
    );
    let want_b = generate_local(
        &refs.path().join("b.png"),
        prompt,
        seed,
        &[(fixture("sd15_kohya"), 0.5), (fixture("sd15_peft"), -1.0)],
    );
    assert_ne!(want_plain, want_a, "the LoRA changes the image");
    assert_ne!(want_plain, want_b, "the LoRAs change the image");
    assert_ne!(want_a, want_b, "two LoRA sets give two images");

    tokio_runtime().block_on(async {
        let client_a = bus.connect().await;
        let client_b = bus.connect().await;
        let check = |what: &str, png: &[u8], want: &[u8]| {
            assert!(
                png_rgb(png) == want,
                "{what}: the daemon's image differs from generate --local's"
            );
        };

        // Round 1: the base model, then each set's first request (its load).
        let (png, t_plain_first) = run_job(&client_a, request(prompt, seed, &[], &[])).await;
        check("round 1, plain", &png, &want_plain);
        let rss_base = rss_kb(daemon.pid());
        assert!(lora_sets(&client_a).await.is_empty());
        let (png, t_a_first) = run_job(&client_a, request(prompt, seed, set_a, &[])).await;
        check("round 1, set A", &png, &want_a);
        let (png, t_b_first) = run_job(&client_b, request(prompt, seed, set_b, &[])).await;
        check("round 1, set B", &png, &want_b);
        let rss_two_sets = rss_kb(daemon.pid());

        // Round 2: every set loaded already.
        let (png, t_plain_again) = run_job(&client_a, request(prompt, seed, &[], &[])).await;
        check("round 2, plain", &png, &want_plain);
        let (png, t_a_again) = run_job(&client_a, request(prompt, seed, set_a, &[])).await;
        check("round 2, set A", &png, &want_a);
        let (png, t_b_again) = run_job(&client_b, request(prompt, seed, set_b, &[])).await;
        check("round 2, set B", &png, &want_b);

        // Round 3: both clients' requests queued at once, interleaved: each image is still
        // the one its request makes alone (jobs of different sets never share a batch).
        let order: [(&zbus::Connection, LoraSet<'_>, &[u8], &str); 6] = [
            (&client_a, set_a, &want_a, "round 3, set A"),
            (&client_b, set_b, &want_b, "round 3, set B"),
            (&client_a, &[], &want_plain, "round 3, plain"),
            (
                &client_b,
                set_b_reversed,
                &want_b,
                "round 3, set B reversed",
            ),
            (&client_a, set_a, &want_a, "round 3, set A again"),
            (&client_b, &[], &want_plain, "round 3, plain again"),
        ];
        let mut paths = Vec::new();
        for (conn, set, _, _) in &order {
            paths.push(
                generate(conn, request(prompt, seed, set, &[]))
                    .await
                    .unwrap(),
            );
        }
        for ((conn, _, want, what), path) in order.iter().zip(&paths) {
            let result = wait(conn, path).await.unwrap();
            let pngs = result_pngs(&result);
            assert_eq!(pngs.len(), 1, "{what}");
            check(what, &pngs[0], want);
        }

        // Two sets, each loaded once (the order of a set's LoRAs does not matter).
        assert_eq!(
            lora_sets(&client_b).await,
            ["sd15_kohya=0.5,sd15_peft=-1", "sd15_kohya=0.8"],
            "ListModels lora_sets"
        );

        eprintln!("LoRA set switch timings (Generate to result, 64x64, {STEPS} steps):");
        eprintln!("  plain, first request (base model load): {t_plain_first:?}");
        eprintln!("  plain, repeated:                        {t_plain_again:?}");
        eprintln!("  set A {{sd15_kohya: 0.8}}, first request (new set): {t_a_first:?}");
        eprintln!("  set A, repeated (loaded set):                      {t_a_again:?}");
        eprintln!(
            "  set B {{sd15_kohya: 0.5, sd15_peft: -1}}, first request (new set): {t_b_first:?}"
        );
        eprintln!(
            "  set B, repeated (loaded set):                                     {t_b_again:?}"
        );
        eprintln!("daemon RSS with the base model loaded, no LoRA set: {rss_base} kB");
        eprintln!(
            "daemon RSS with two LoRA sets loaded as well:       {rss_two_sets} kB (+{} kB)",
            rss_two_sets as i64 - rss_base as i64
        );
    });

    // `diffusionctl generate --lora NAME:SCALE` through the daemon: the same image.
    let out = refs.path().join("ctl-b.png");
    let o = ctl_command(&[
        "generate",
        "--prompt",
        prompt,
        "--seed",
        &seed.to_string(),
        "--steps",
        &STEPS.to_string(),
        "--width",
        "64",
        "--height",
        "64",
        "--lora",
        "sd15_peft:-1",
        "--lora",
        "sd15_kohya:0.5",
        "--output",
        out.to_str().unwrap(),
        "--address",
        bus.address(),
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        png_rgb(&std::fs::read(&out).unwrap()) == want_b,
        "diffusionctl generate --lora through the daemon"
    );
}

#[test]
fn list_loras_describes_the_files_and_whether_they_fit() {
    let folder = lora_folder(&["sd15_kohya", "sd15_peft", "sdxl_kohya"]);
    // A `.safetensors` file that is no safetensors file: a header length past its end.
    let garbage = folder.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\x00\x00\x00\x00{not json").unwrap();
    let bus = PrivateBus::start();
    let _daemon = daemon_with_model_folder(&bus, folder.path());

    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let list = list_loras(&conn, "tiny").await;
        let names: Vec<String> = list.iter().map(|d| field_str(d, "name")).collect();
        assert_eq!(
            names,
            ["garbage", "sd15_kohya", "sd15_peft", "sdxl_kohya"],
            "sorted by name"
        );
        for d in &list {
            let name = field_str(d, "name");
            let path = folder.path().join(format!("{name}.safetensors"));
            assert_eq!(
                field_u64(d, "size"),
                std::fs::metadata(&path).unwrap().len(),
                "{name}: size"
            );
            let hash = field_str(d, "hash");
            let error = field_str(d, "error");
            let fits = field_bool(d, "fits");
            // Every key is there, with its type.
            let _: Vec<String> = Vec::try_from(d["trigger_words"].try_clone().unwrap()).unwrap();
            let _ = field_str(d, "architecture");
            if name == "garbage" {
                assert!(!fits, "{name}");
                assert!(
                    error.contains("garbage.safetensors"),
                    "{name}: the error names the file: {error:?}"
                );
                continue;
            }
            assert_eq!(hash.len(), 12, "{name}: {hash:?}");
            assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{hash:?}");
            assert_eq!(
                hash,
                diffusiond::lora::Header::read(&path).unwrap().addnet_hash(),
                "{name}: the A1111 short hash"
            );
            if name.starts_with("sd15_") {
                assert!(fits, "{name}: {error}");
                assert!(error.is_empty(), "{name}: {error}");
            } else {
                assert!(!fits, "{name} is an SDXL LoRA");
                assert!(!error.is_empty(), "{name}: says why it does not fit");
                assert_eq!(field_str(d, "architecture"), "sdxl");
            }
        }
        // The empty name is the default model.
        let default: Vec<String> = list_loras(&conn, "")
            .await
            .iter()
            .map(|d| field_str(d, "name"))
            .collect();
        assert_eq!(default, names);

        let e = manager(&conn)
            .await
            .call::<_, _, Vec<HashMap<String, OwnedValue>>>("ListLoras", &("nope",))
            .await
            .expect_err("no model nope");
        assert!(e.to_string().contains("nope"), "{e}");

        // A file copied in while the daemon runs: a request naming it works (the folders
        // are read again on an unknown name) ...
        std::fs::copy(
            fixture("sd15_kohya"),
            folder.path().join("late_style.safetensors"),
        )
        .unwrap();
        let late = run_job(&conn, request("a cat", 9, &[("late_style", 0.7)], &[])).await;
        let early = run_job(&conn, request("a cat", 9, &[("sd15_kohya", 0.7)], &[])).await;
        assert_eq!(
            png_rgb(&late.0),
            png_rgb(&early.0),
            "one file under two names gives one image"
        );
        // ... and the next ListLoras lists another one.
        std::fs::copy(
            fixture("sd15_peft"),
            folder.path().join("later_peft.safetensors"),
        )
        .unwrap();
        let list = list_loras(&conn, "tiny").await;
        let later = list
            .iter()
            .find(|d| field_str(d, "name") == "later_peft")
            .expect("a file added after start is listed");
        assert!(field_bool(later, "fits"));
        assert!(list.iter().any(|d| field_str(d, "name") == "late_style"));
    });

    // The same through `diffusionctl loras`.
    let o = ctl_command(&["loras", "--model", "tiny", "--address", bus.address()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let header = out.lines().next().unwrap_or_default();
    for column in ["NAME", "HASH", "BASE", "FITS", "BYTES", "TRIGGER WORDS"] {
        assert!(header.contains(column), "{out}");
    }
    let kohya_hash = diffusiond::lora::Header::read(&fixture("sd15_kohya"))
        .unwrap()
        .addnet_hash();
    assert!(
        out.lines()
            .any(|l| l.starts_with("sd15_kohya") && l.contains(&kohya_hash)),
        "{out}"
    );
    assert!(out.contains("sdxl_kohya: "), "the error is shown: {out}");
}

#[test]
fn bad_lora_requests_are_refused_naming_the_key_and_the_lora() {
    let folder = lora_folder(&["sd15_kohya", "sdxl_kohya"]);
    let bus = PrivateBus::start();
    // The shared `[loras] path` this time.
    let _daemon = Daemon::start(
        &bus,
        &format!(
            "[loras]\npath = [\"{}\"]\n\n[limits]\nmax_loras = 2\n",
            folder.path().display()
        ),
    );
    let a1111 = || ("prompt_syntax", Value::from("a1111"));

    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let plain_before = run_job(&conn, request("a cat", 5, &[], &[])).await.0;

        let (name, msg) = refused(&conn, request("a cat", 5, &[("nope", 1.0)], &[])).await;
        assert_eq!(name, INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("'loras'") && msg.contains("nope"),
            "unknown: {msg}"
        );
        assert!(
            msg.contains("sd15_kohya"),
            "the known names are listed: {msg}"
        );

        let (name, msg) = refused(
            &conn,
            request("a cat", 5, &[("sd15_kohya", 0.5), ("sd15_kohya", 1.0)], &[]),
        )
        .await;
        assert_eq!(name, INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("'loras'") && msg.contains("sd15_kohya") && msg.contains("more than once"),
            "duplicate: {msg}"
        );

        let (name, msg) = refused(&conn, request("a cat", 5, &[("sd15_kohya", 5.0)], &[])).await;
        assert_eq!(name, INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("'loras'") && msg.contains("sd15_kohya") && msg.contains("[-4, 4]"),
            "scale past the limit: {msg}"
        );

        let (name, msg) = refused(
            &conn,
            request(
                "a cat",
                5,
                &[("sd15_kohya", 0.1), ("sdxl_kohya", 0.1), ("x", 0.1)],
                &[],
            ),
        )
        .await;
        assert_eq!(name, INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("'loras'") && msg.contains("at most 2"),
            "max_loras: {msg}"
        );

        for wrong in [
            Value::from(vec!["sd15_kohya"]),
            Value::from("sd15_kohya"),
            Value::new(vec![("sd15_kohya".to_string(), 1u32)]),
        ] {
            let sig = wrong.value_signature().to_string();
            let mut req = request("a cat", 5, &[], &[]);
            req.insert("loras".into(), wrong.try_to_owned().unwrap());
            let (name, msg) = refused(&conn, req).await;
            assert_eq!(name, INVALID_ARGUMENT, "{sig}: {msg}");
            assert!(msg.contains("loras"), "{sig}: {msg}");
        }

        // Only the folders' names: never a path, inside the folder or out of it.
        let inside = folder.path().join("sd15_kohya.safetensors");
        let inside = inside.to_str().unwrap();
        let outside = fixture("sd15_kohya");
        for name in [
            inside,
            outside.to_str().unwrap(),
            "../loras/sd15_kohya",
            "sd15_kohya.safetensors",
        ] {
            let (e, msg) = refused(&conn, request("a cat", 5, &[(name, 1.0)], &[])).await;
            assert_eq!(e, INVALID_ARGUMENT, "{name}: {msg}");
            assert!(msg.contains("unknown LoRA"), "{name}: {msg}");
        }

        let (name, msg) = refused(&conn, request("a cat <lora:nope:1>", 5, &[], &[a1111()])).await;
        assert_eq!(name, INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("'prompt'") && msg.contains("nope"),
            "tag: {msg}"
        );

        let (name, msg) = refused(
            &conn,
            request(
                "a cat",
                5,
                &[],
                &[
                    a1111(),
                    ("negative_prompt", Value::from("<lora:sd15_kohya:1>")),
                ],
            ),
        )
        .await;
        assert_eq!(name, INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains("'negative_prompt'"), "{msg}");

        // A LoRA of another architecture: accepted, then the job fails at load.
        let path = generate(&conn, request("a cat", 5, &[("sdxl_kohya", 1.0)], &[]))
            .await
            .expect("a LoRA that does not fit is known only at load");
        let e = wait(&conn, &path)
            .await
            .expect_err("a LoRA that does not fit fails the job");
        let msg = e.to_string();
        assert_eq!(error_name(&e), INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("'loras'") && msg.contains("sdxl_kohya.safetensors"),
            "does not fit: {msg}"
        );
        let job = zbus::Proxy::new(
            &conn,
            "io.github.Diffusiond1",
            path.as_str(),
            "io.github.Diffusiond1.Job",
        )
        .await
        .unwrap();
        let state: String = job.get_property("State").await.unwrap();
        assert_eq!(state, "failed");
        let job_error: String = job.get_property("Error").await.unwrap();
        assert!(job_error.contains("sdxl_kohya"), "{job_error}");
        assert!(
            !lora_sets(&conn)
                .await
                .iter()
                .any(|s| s.contains("sdxl_kohya")),
            "a set that failed to load is not listed"
        );

        // Nothing was applied in part: the plain image is the one made before, and a
        // LoRA that fits still applies.
        let plain_after = run_job(&conn, request("a cat", 5, &[], &[])).await.0;
        assert_eq!(png_rgb(&plain_before), png_rgb(&plain_after));
        let good = run_job(&conn, request("a cat", 5, &[("sd15_kohya", 1.0)], &[]))
            .await
            .0;
        assert_ne!(png_rgb(&good), png_rgb(&plain_after));
        let plain_again = run_job(&conn, request("a cat", 5, &[], &[])).await.0;
        assert_eq!(png_rgb(&plain_before), png_rgb(&plain_again));

        // A set is unloaded like a model: `keep_alive` 0 unloads it after its job.
        let sets = lora_sets(&conn).await;
        assert!(sets.contains(&"sd15_kohya=1".to_string()), "{sets:?}");
        let keep_alive = ("keep_alive", Value::from(0.0));
        run_job(
            &conn,
            request("a cat", 5, &[("sd15_kohya", 0.25)], &[keep_alive]),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while lora_sets(&conn)
            .await
            .contains(&"sd15_kohya=0.25".to_string())
        {
            assert!(
                Instant::now() < deadline,
                "keep_alive 0 left the LoRA set loaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sets = lora_sets(&conn).await;
        assert!(
            sets.contains(&"sd15_kohya=1".to_string()),
            "other sets stay: {sets:?}"
        );
    });
}

#[test]
fn a1111_lora_tags_equal_the_loras_key() {
    let folder = lora_folder(&["sd15_kohya"]);
    let bus = PrivateBus::start();
    let _daemon = daemon_with_model_folder(&bus, folder.path());
    let a1111 = || ("prompt_syntax", Value::from("a1111"));
    let hash = diffusiond::lora::Header::read(&fixture("sd15_kohya"))
        .unwrap()
        .addnet_hash();

    let (tagged, keyed) = tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let tagged = run_job(
            &conn,
            request("a cat <lora:sd15_kohya:0.8>", 77, &[], &[a1111()]),
        )
        .await
        .0;
        let keyed = run_job(
            &conn,
            request("a cat", 77, &[("sd15_kohya", 0.8)], &[a1111()]),
        )
        .await
        .0;
        let plain = run_job(&conn, request("a cat", 77, &[], &[a1111()]))
            .await
            .0;
        assert_eq!(
            png_rgb(&tagged),
            png_rgb(&keyed),
            "the tag and the key give one image"
        );
        assert_ne!(
            png_rgb(&tagged),
            png_rgb(&plain),
            "the tag applies the LoRA"
        );
        // One set, one loaded copy.
        assert_eq!(lora_sets(&conn).await, ["sd15_kohya=0.8"]);

        let params = parameters(&tagged);
        assert_eq!(
            params.lines().next(),
            Some("a cat <lora:sd15_kohya:0.8>"),
            "the prompt line keeps its tag: {params}"
        );
        assert!(params.contains("Lora hashes: "), "{params}");
        assert!(
            params.contains(&format!("sd15_kohya: {hash}")),
            "Lora hashes names the file's hash {hash}: {params}"
        );
        let params = parameters(&keyed);
        assert!(params.contains("Loras: "), "the loras key: {params}");
        assert!(params.contains("sd15_kohya: 0.8"), "{params}");
        assert!(params.contains(&format!("sd15_kohya: {hash}")), "{params}");
        assert!(
            !parameters(&plain).contains("Lora"),
            "no LoRA, no LoRA keys: {}",
            parameters(&plain)
        );
        (tagged, keyed)
    });

    // `diffusionctl verify` makes both again with the file given back.
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny().display().to_string();
    let lora = fixture("sd15_kohya").display().to_string();
    for (what, png) in [("tagged", &tagged), ("keyed", &keyed)] {
        let file = tmp.path().join(format!("{what}.png"));
        std::fs::write(&file, png).unwrap();
        let file = file.display().to_string();
        let o = ctl(
            &tmp.path().join("state"),
            &["verify", &file, "--model-dir", &model, "--lora", &lora],
        );
        assert!(o.status.success(), "{what}: {}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).lines().last(),
            Some("identical"),
            "{what}: {}",
            text(&o)
        );
    }
}

#[test]
fn a_daemon_batch_applies_manifest_loras() {
    let folder = lora_folder(&["sd15_kohya"]);
    let bus = PrivateBus::start();
    let _daemon = daemon_with_model_folder(&bus, folder.path());
    let work = tempfile::tempdir().unwrap();
    let line = |name: &str, lora: Option<&str>| {
        let loras = lora.map_or(String::new(), |l| format!(r#","loras":[["{l}",0.5]]"#));
        format!(
            r#"{{"name":"{name}","prompt":"a red fox","seed":321,"steps":{STEPS},"width":64,"height":64{loras}}}"#
        )
    };
    let run_batch = |manifest: &Path, out: &Path| {
        ctl_command(&[
            "batch",
            manifest.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--address",
            bus.address(),
        ])
        .output()
        .unwrap()
    };
    let want_styled = generate_local(
        &work.path().join("ref-styled.png"),
        "a red fox",
        321,
        &[(fixture("sd15_kohya"), 0.5)],
    );
    let want_plain = generate_local(&work.path().join("ref-plain.png"), "a red fox", 321, &[]);

    let manifest = work.path().join("m.jsonl");
    std::fs::write(
        &manifest,
        format!(
            "{}\n{}\n",
            line("styled", Some("sd15_kohya")),
            line("plain", None)
        ),
    )
    .unwrap();
    let out = work.path().join("out");
    let o = run_batch(&manifest, &out);
    assert!(o.status.success(), "{}", text(&o));
    let styled = std::fs::read(out.join("styled.png")).unwrap();
    assert!(png_rgb(&styled) == want_styled, "the line with loras");
    assert!(
        png_rgb(&std::fs::read(out.join("plain.png")).unwrap()) == want_plain,
        "the line without"
    );
    assert!(parameters(&styled).contains("Lora hashes: "));

    // A line naming a LoRA the daemon does not have: refused with its line number.
    std::fs::write(&manifest, format!("{}\n", line("x", Some("nope")))).unwrap();
    let o = run_batch(&manifest, &work.path().join("out-nope"));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("line 1: 'loras': unknown LoRA 'nope'"),
        "{}",
        text(&o)
    );

    // A file copied into the folder while the daemon runs, named only by a batch.
    std::fs::copy(
        fixture("sd15_kohya"),
        folder.path().join("late_style.safetensors"),
    )
    .unwrap();
    std::fs::write(&manifest, format!("{}\n", line("late", Some("late_style")))).unwrap();
    let out = work.path().join("out-late");
    let o = run_batch(&manifest, &out);
    assert!(
        o.status.success(),
        "a batch naming a LoRA file added since start: {}",
        text(&o)
    );
    assert!(png_rgb(&std::fs::read(out.join("late.png")).unwrap()) == want_styled);
}
