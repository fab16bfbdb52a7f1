//! The ControlNet flags of `generate`: `--controlnet NAME --control-image FILE
//! [--control-scale S] [--control-start A] [--control-end B]`, repeatable, paired by
//! order: the i-th `--control-image`, `--control-scale`, `--control-start` and
//! `--control-end` belong to the i-th `--controlnet`. They make the request's `controls`;
//! through the daemon each image is sent as bytes (`image`), with `--local` NAME is a
//! folder under the model folder's `controlnet/`.

use std::path::PathBuf;

use clap::Args;
use diffusiond::request::{ControlInput, ImageInput};

/// The ControlNet flags (a contract: scripts call them by these names).
#[derive(Debug, Clone, Default, Args)]
pub struct ControlFlags {
    /// A ControlNet that steers the image, by name (repeatable): through the daemon, one
    /// of the model's (`diffusionctl models` lists them); with --local, a folder under
    /// the model folder's controlnet/. Each needs its --control-image.
    #[arg(long, value_name = "NAME")]
    pub controlnet: Vec<String>,
    /// The control image (PNG or JPEG: an edge, depth or pose map, used as given) of the
    /// --controlnet of the same rank (repeatable).
    #[arg(long, value_name = "FILE")]
    pub control_image: Vec<PathBuf>,
    /// What the residuals of the --controlnet of the same rank are multiplied by, 0..2
    /// (repeatable) [default: 1].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub control_scale: Vec<f64>,
    /// The fraction of the steps before which the --controlnet of the same rank is off
    /// (repeatable) [default: 0].
    #[arg(long, value_name = "A", allow_negative_numbers = true)]
    pub control_start: Vec<f64>,
    /// The fraction of the steps after which the --controlnet of the same rank is off
    /// (repeatable) [default: 1].
    #[arg(long, value_name = "B", allow_negative_numbers = true)]
    pub control_end: Vec<f64>,
    /// diffusers' guess mode for the ControlNets: they see only the conditional half of
    /// the guidance batch, their residuals scaled from 0.1 (first block) to 1 (mid block).
    #[arg(long)]
    pub control_guess_mode: bool,
}

/// One ControlNet the flags give, its image not read yet.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlFlag {
    /// `--controlnet`.
    pub name: String,
    /// `--control-image`.
    pub image: PathBuf,
    /// `--control-scale`.
    pub scale: Option<f64>,
    /// `--control-start`.
    pub start: Option<f64>,
    /// `--control-end`.
    pub end: Option<f64>,
}

impl ControlFlags {
    /// The flags paired by rank, or which flag has no partner.
    pub fn paired(&self) -> Result<Vec<ControlFlag>, String> {
        let n = self.controlnet.len();
        let rule = "the i-th --control-image, --control-scale, --control-start and \
                    --control-end belong to the i-th --controlnet";
        if let Some(extra) = self.control_image.get(n) {
            return Err(format!(
                "--control-image {}: more --control-image than --controlnet ({rule})",
                extra.display()
            ));
        }
        for (flag, values) in [
            ("--control-scale", &self.control_scale),
            ("--control-start", &self.control_start),
            ("--control-end", &self.control_end),
        ] {
            if let Some(extra) = values.get(n) {
                return Err(format!(
                    "{flag} {extra}: no --controlnet for it ({n} --controlnet given; {rule})"
                ));
            }
        }
        self.controlnet
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let image = self.control_image.get(i).ok_or_else(|| {
                    format!(
                        "--controlnet {name} has no --control-image (give one per \
                         --controlnet, in the same order)"
                    )
                })?;
                Ok(ControlFlag {
                    name: name.clone(),
                    image: image.clone(),
                    scale: self.control_scale.get(i).copied(),
                    start: self.control_start.get(i).copied(),
                    end: self.control_end.get(i).copied(),
                })
            })
            .collect()
    }

    /// `control_guess_mode` as the request sends it (only when given).
    pub fn guess_mode(&self) -> Option<bool> {
        self.control_guess_mode.then_some(true)
    }

    /// The request's `controls` (`None` without `--controlnet`), each image read.
    pub fn inputs(&self) -> Result<Option<Vec<ControlInput>>, String> {
        let paired = self.paired()?;
        if paired.is_empty() {
            return Ok(None);
        }
        paired
            .into_iter()
            .map(|c| {
                let bytes = std::fs::read(&c.image)
                    .map_err(|e| format!("--control-image {}: {e}", c.image.display()))?;
                Ok(ControlInput {
                    controlnet: Some(c.name),
                    image: Some(ImageInput::new(bytes)),
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        controls: ControlFlags,
    }

    fn flags(args: &[&str]) -> ControlFlags {
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().controls
    }

    #[test]
    fn flags_pair_by_rank() {
        let f = flags(&[
            "--controlnet",
            "canny",
            "--control-image",
            "edges.png",
            "--control-scale",
            "0.8",
            "--controlnet",
            "depth",
            "--control-image",
            "depth.png",
            "--control-scale",
            "1.5",
            "--control-start",
            "0",
            "--control-end",
            "0.5",
        ]);
        let p = f.paired().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            ControlFlag {
                name: "canny".into(),
                image: "edges.png".into(),
                scale: Some(0.8),
                start: Some(0.0),
                end: Some(0.5),
            }
        );
        assert_eq!(p[1].name, "depth");
        assert_eq!(p[1].image, PathBuf::from("depth.png"));
        assert_eq!((p[1].scale, p[1].start, p[1].end), (Some(1.5), None, None));
        assert!(flags(&[]).paired().unwrap().is_empty());
        assert_eq!(flags(&[]).inputs().unwrap(), None);
        // Out-of-range values are the resolve step's: the flags take them as given.
        let p = flags(&[
            "--controlnet",
            "c",
            "--control-image",
            "i.png",
            "--control-scale",
            "-1",
        ])
        .paired()
        .unwrap();
        assert_eq!(p[0].scale, Some(-1.0));
    }

    #[test]
    fn a_flag_without_its_partner_is_named() {
        let e = flags(&["--controlnet", "canny"]).paired().unwrap_err();
        assert_eq!(
            e,
            "--controlnet canny has no --control-image (give one per --controlnet, in the same order)"
        );
        let e = flags(&[
            "--controlnet",
            "canny",
            "--control-image",
            "a.png",
            "--controlnet",
            "depth",
        ])
        .paired()
        .unwrap_err();
        assert!(
            e.starts_with("--controlnet depth has no --control-image"),
            "{e}"
        );
        let e = flags(&["--control-image", "a.png"]).paired().unwrap_err();
        assert!(
            e.starts_with("--control-image a.png: more --control-image than --controlnet"),
            "{e}"
        );
        let e = flags(&[
            "--controlnet",
            "canny",
            "--control-image",
            "a.png",
            "--control-image",
            "b.png",
        ])
        .paired()
        .unwrap_err();
        assert!(e.starts_with("--control-image b.png: more"), "{e}");
        for flag in ["--control-scale", "--control-start", "--control-end"] {
            let e = flags(&[flag, "0.5"]).paired().unwrap_err();
            assert!(
                e.starts_with(&format!("{flag} 0.5: no --controlnet for it")),
                "{e}"
            );
            let e = flags(&[
                "--controlnet",
                "canny",
                "--control-image",
                "a.png",
                flag,
                "0.5",
                flag,
                "0.25",
            ])
            .paired()
            .unwrap_err();
            assert!(
                e.starts_with(&format!("{flag} 0.25: no --controlnet for it")),
                "{e}"
            );
        }
    }

    #[test]
    fn images_are_read_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edges.png");
        std::fs::write(&path, b"png bytes").unwrap();
        let p = path.to_str().unwrap();
        let c = flags(&["--controlnet", "canny", "--control-image", p])
            .inputs()
            .unwrap()
            .unwrap();
        assert_eq!(c[0].controlnet.as_deref(), Some("canny"));
        assert_eq!(c[0].image, Some(ImageInput::new(b"png bytes".to_vec())));
        assert_eq!((c[0].scale, c[0].start, c[0].end), (None, None, None));
        let missing = dir.path().join("nope.png");
        let e = flags(&[
            "--controlnet",
            "canny",
            "--control-image",
            missing.to_str().unwrap(),
        ])
        .inputs()
        .unwrap_err();
        assert!(
            e.starts_with(&format!("--control-image {}: ", missing.display())),
            "{e}"
        );
    }
}
