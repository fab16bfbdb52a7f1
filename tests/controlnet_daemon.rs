//! ControlNet over D-Bus, with the real daemon on a private bus and a ControlNet-ready copy
//! of the tiny SD 1.5 model (`onnx/tiny-sd15` with `onnx/tiny-controlnet/tiny-sd15` over
//! it: a UNet with residual inputs, ControlNets `canny` and `depth`):
//! - a `controls` request with its control images sent as bytes (`image`, by
//!   `diffusionctl generate --controlnet` and straight over zbus) and as file descriptors
//!   (`image_fd`) gives the image `diffusionctl generate --local` makes; the PNG records
//!   each ControlNet as sd-webui-controlnet does; `ListModels` lists the ControlNets
//!   (`controlnets`), `diffusionctl models` too; the Job's `Request` shows each control
//!   image by its SHA-256;
//! - every bad `controls` field is an InvalidArgument naming `controls[i].FIELD`, and the
//!   daemon keeps serving;
//! - the stock tiny-sd15 (a UNet without ControlNet inputs) refuses `controls`, and keeps
//!   serving.
//!
//! Images compare with the parity tests' bar (the daemon and `--local` may run ONNX
//! Runtime with different thread counts).

mod common;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use common::batch::assert_close;
use common::lora::{field_str, manager, refused, run_job};
use common::{
    Daemon, Dict, PrivateBus, config_text, ctl_command, generate, png_parameters, png_rgb, root,
    tokio_runtime,
};
use zbus::zvariant::{OwnedValue, Value};

const INVALID: &str = "io.github.Diffusiond1.Error.InvalidArgument";

const PROMPT: &str = "a house on a hill";
const SEED: u64 = 31;
const STEPS: u32 = 3;

fn control_path(name: &str) -> PathBuf {
    root().join("tests/golden/controlnet/controls").join(name)
}

/// A daemon serving `tiny` (the stock tiny-sd15) and `cn` (the ControlNet-ready copy in
/// `model`).
fn daemon(bus: &PrivateBus, model: &Path) -> Daemon {
    Daemon::start_with_config(
        bus,
        &config_text(&format!("[models.cn]\npath = \"{}\"\n", model.display())),
    )
}

/// `diffusionctl generate` flags for the common request, then `extra`.
fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut f = vec![
        "--prompt", PROMPT, "--seed", "31", "--steps", "3", "--width", "64", "--height", "64",
    ];
    f.extend_from_slice(extra);
    f
}

/// `diffusionctl generate --local` on `model` with these flags: the PNG.
fn local(model: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "generate",
        "--local",
        "--model-dir",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(flags(extra));
    let o = ctl_command(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

/// The common request for `model`, with `controls` when given.
fn request(model: &str, controls: Option<Value<'_>>) -> Dict {
    let mut d: Dict = [
        ("prompt", Value::from(PROMPT)),
        ("seed", Value::U64(SEED)),
        ("steps", Value::U32(STEPS)),
        ("width", Value::U32(64)),
        ("height", Value::U32(64)),
        ("model", Value::from(model)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
    .collect();
    if let Some(c) = controls {
        d.insert("controls".into(), c.try_to_owned().unwrap());
    }
    d
}

/// One control dict.
fn control(fields: Vec<(&'static str, Value<'static>)>) -> HashMap<&'static str, Value<'static>> {
    fields.into_iter().collect()
}

fn controls(dicts: Vec<HashMap<&'static str, Value<'static>>>) -> Value<'static> {
    Value::from(dicts)
}

fn fd(path: &Path) -> Value<'static> {
    let file = std::fs::File::open(path).unwrap();
    Value::from(zbus::zvariant::Fd::from(OwnedFd::from(file)))
}

fn bytes(path: &Path) -> Value<'static> {
    Value::from(std::fs::read(path).unwrap())
}

#[test]
fn controlnet_requests_by_bytes_and_by_fd_give_the_local_image() {
    let model = common::controlnet::ready_model("tiny-sd15");
    let bus = PrivateBus::start();
    let _d = daemon(&bus, model.path());
    let dir = tempfile::tempdir().unwrap();
    let canny = control_path("canny.png");
    let depth = control_path("depth.png");
    let canny_s = canny.to_str().unwrap();
    let depth_s = depth.to_str().unwrap();

    let one = [
        "--controlnet",
        "canny",
        "--control-image",
        canny_s,
        "--control-scale",
        "0.8",
    ];
    let two = [
        "--controlnet",
        "canny",
        "--control-image",
        canny_s,
        "--controlnet",
        "depth",
        "--control-image",
        depth_s,
        "--control-scale",
        "1",
        "--control-scale",
        "0.6",
        "--control-start",
        "0",
        "--control-start",
        "0.2",
        "--control-end",
        "1",
        "--control-end",
        "0.8",
    ];
    let plain = local(model.path(), &dir.path().join("plain.png"), &[]);
    let want_one_png = local(model.path(), &dir.path().join("one.png"), &one);
    let want_two_png = local(model.path(), &dir.path().join("two.png"), &two);
    let (want_one, want_two) = (png_rgb(&want_one_png), png_rgb(&want_two_png));
    assert_ne!(
        png_rgb(&plain),
        want_one,
        "the ControlNet changes the image"
    );
    assert_ne!(
        want_one, want_two,
        "the second ControlNet changes the image"
    );
    let params = png_parameters(&want_two_png).unwrap();
    assert!(
        params.contains(
            "ControlNet 0: \"Module: none, Model: canny, Weight: 1, Guidance Start: 0, Guidance End: 1\", \
             ControlNet 1: \"Module: none, Model: depth, Weight: 0.6, Guidance Start: 0.2, Guidance End: 0.8\""
        ),
        "{params}"
    );

    // diffusionctl through the daemon: the images go as bytes.
    for (extra, want, what) in [
        (&one[..], &want_one, "one ControlNet, diffusionctl"),
        (&two[..], &want_two, "two ControlNets, diffusionctl"),
    ] {
        let out = dir.path().join("daemon.png");
        let mut args = vec![
            "generate",
            "--address",
            bus.address(),
            "--model",
            "cn",
            "--output",
        ];
        args.push(out.to_str().unwrap());
        args.extend(flags(extra));
        let o = ctl_command(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let png = std::fs::read(&out).unwrap();
        assert_close(&png_rgb(&png), want, what);
        let p = png_parameters(&png).unwrap();
        assert!(
            p.contains("ControlNet 0: \"Module: none, Model: canny"),
            "{p}"
        );
    }

    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        // Bytes, straight over zbus.
        let c = controls(vec![control(vec![
            ("controlnet", Value::from("canny")),
            ("image", bytes(&canny)),
            ("scale", Value::F64(0.8)),
        ])]);
        let (png, _) = run_job(&conn, request("cn", Some(c))).await;
        assert_close(&png_rgb(&png), &want_one, "one ControlNet, bytes");
        // A file descriptor.
        let c = controls(vec![control(vec![
            ("controlnet", Value::from("canny")),
            ("image_fd", fd(&canny)),
            ("scale", Value::F64(0.8)),
        ])]);
        let (png, _) = run_job(&conn, request("cn", Some(c))).await;
        assert_close(&png_rgb(&png), &want_one, "one ControlNet, fd");
        // Two, one by bytes and one by fd, each with its own range.
        let c = controls(vec![
            control(vec![
                ("controlnet", Value::from("canny")),
                ("image_fd", fd(&canny)),
            ]),
            control(vec![
                ("controlnet", Value::from("depth")),
                ("image", bytes(&depth)),
                ("scale", Value::F64(0.6)),
                ("start", Value::F64(0.2)),
                ("end", Value::F64(0.8)),
            ]),
        ]);
        let path = generate(&conn, request("cn", Some(c))).await.unwrap();
        // The Request property: each control image by its SHA-256, no bytes.
        let job = zbus::Proxy::new(
            &conn,
            "io.github.Diffusiond1",
            path.as_str(),
            "io.github.Diffusiond1.Job",
        )
        .await
        .unwrap();
        let shown: HashMap<String, OwnedValue> = job.get_property("Request").await.unwrap();
        let shown: Vec<HashMap<String, OwnedValue>> =
            shown["controls"].try_clone().unwrap().try_into().unwrap();
        assert_eq!(shown.len(), 2);
        assert_eq!(field_str(&shown[1], "controlnet"), "depth");
        assert_eq!(f64::try_from(&shown[1]["start"]).unwrap(), 0.2);
        assert_eq!(field_str(&shown[0], "image_sha256").len(), 64);
        assert!(!shown[0].contains_key("image"));
        let result = common::wait(&conn, &path).await.unwrap();
        assert_close(
            &png_rgb(&common::result_pngs(&result)[0]),
            &want_two,
            "two ControlNets, bytes and fd",
        );

        // ListModels: the ControlNets of each model.
        let models: Vec<HashMap<String, OwnedValue>> =
            manager(&conn).await.call("ListModels", &()).await.unwrap();
        let controlnets = |name: &str| {
            let m = models
                .iter()
                .find(|m| field_str(m, "name") == name)
                .unwrap();
            Vec::<String>::try_from(m["controlnets"].try_clone().unwrap()).unwrap()
        };
        assert_eq!(controlnets("cn"), ["canny", "depth"]);
        assert!(controlnets("tiny").is_empty());
    });
    let o = ctl_command(&["models", "--address", bus.address()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("\ncn controlnets: canny, depth\n"), "{text}");
}

#[test]
fn bad_controls_are_typed_errors_naming_the_field_and_the_daemon_keeps_serving() {
    let model = common::controlnet::ready_model("tiny-sd15");
    let bus = PrivateBus::start();
    let _d = daemon(&bus, model.path());
    let canny = control_path("canny.png");
    let ok = || {
        vec![
            ("controlnet", Value::from("canny")),
            ("image", bytes(&canny)),
        ]
    };
    let with = |extra: Vec<(&'static str, Value<'static>)>| {
        let mut fields = ok();
        fields.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        fields.extend(extra);
        control(fields)
    };
    let without = |field: &str| {
        let mut fields = ok();
        fields.retain(|(k, _)| *k != field);
        control(fields)
    };
    let (pipe_read, _pipe_write) = std::io::pipe().unwrap();
    let pipe = Value::from(zbus::zvariant::Fd::from(OwnedFd::from(pipe_read)));
    let cases: Vec<(Vec<HashMap<&'static str, Value<'static>>>, &str)> = vec![
        (
            vec![without("controlnet")],
            "'controls[0].controlnet': missing",
        ),
        (
            vec![with(vec![("controlnet", Value::from("pose"))])],
            "'controls[0].controlnet': model 'cn' has no ControlNet 'pose' (it has: canny, depth)",
        ),
        (
            vec![control(ok()), without("image")],
            "'controls[1].image': missing",
        ),
        (
            vec![with(vec![("image", Value::from(b"not an image".to_vec()))])],
            "'controls[0].image': not a PNG or JPEG",
        ),
        (
            vec![with(vec![("scale", Value::F64(2.5))])],
            "'controls[0].scale': 2.5 is not between 0 and 2",
        ),
        (
            vec![with(vec![
                ("start", Value::F64(0.6)),
                ("end", Value::F64(0.5)),
            ])],
            "'controls[0].end': 0.5 is not after start 0.6",
        ),
        (
            vec![with(vec![("scale", Value::from("0.5"))])],
            "'controls[0].scale' must have D-Bus type 'd', got 's'",
        ),
        (
            vec![with(vec![("weight", Value::F64(1.0))])],
            "'controls[0].weight': unknown field",
        ),
        (
            vec![with(vec![("image_fd", fd(&canny))])],
            "'controls[0].image': give 'image' or 'image_fd', not both",
        ),
        (
            vec![control(vec![
                ("controlnet", Value::from("canny")),
                ("image_fd", pipe),
            ])],
            "'controls[0].image_fd': must be a regular file",
        ),
        (
            (0..5).map(|_| control(ok())).collect(),
            "'controls': 5 ControlNets is above the limit of 4",
        ),
    ];
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        for (dicts, want) in cases {
            let (name, message) = refused(&conn, request("cn", Some(controls(dicts)))).await;
            assert_eq!(name, INVALID, "{message}");
            assert!(message.contains(want), "{message:?} lacks {want:?}");
        }
        // A wrong type for the key itself.
        let (name, message) = refused(&conn, request("cn", Some(Value::from("canny")))).await;
        assert_eq!(name, INVALID);
        assert!(
            message.contains("'controls' must have D-Bus type 'aa{sv}', got 's'"),
            "{message}"
        );
        // Still serving: a plain request and a ControlNet request run.
        run_job(&conn, request("cn", None)).await;
        let c = controls(vec![control(ok())]);
        run_job(&conn, request("cn", Some(c))).await;
    });
    // diffusionctl names a --controlnet without its image before asking the daemon.
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("x.png");
    let mut args = vec!["generate", "--address", bus.address(), "--output"];
    args.push(out.to_str().unwrap());
    args.extend(flags(&["--controlnet", "canny"]));
    let o = ctl_command(&args).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--controlnet canny has no --control-image"),
        "{err}"
    );
}

#[test]
fn a_model_without_controlnet_inputs_refuses_controls_and_keeps_serving() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    let canny = control_path("canny.png");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let c = controls(vec![control(vec![
            ("controlnet", Value::from("canny")),
            ("image", bytes(&canny)),
        ])]);
        let (name, message) = refused(&conn, request("tiny", Some(c))).await;
        assert_eq!(name, INVALID, "{message}");
        assert!(
            message.contains(
                "'controls[0].controlnet': model 'tiny' has a UNet without ControlNet inputs"
            ),
            "{message}"
        );
        run_job(&conn, request("tiny", None)).await;
    });
}
