//! A real Slurm run of the array job in `examples/slurm/batch.sbatch` (the one
//! docs/fleets.md shows): the test starts `munged`, `slurmctld` and `slurmd` on this one
//! machine (a one-node cluster with 2 CPUs, configured in a temp folder), submits the
//! committed script with `--array=0-2` so that each task runs
//! `diffusionctl batch … --local --shard $SLURM_ARRAY_TASK_ID/3` into one shared folder,
//! cancels one task while it runs (`scancel JOB_1`) and requeues it (`scontrol requeue`), as
//! a preemption would. At the end every item is there exactly once (the files the cancelled
//! run had finished are not written again), each equal to `generate --local`'s image, and
//! no temporary file is left.
//!
//! Needs root and Debian's `slurm-wlm` and `munge` (`.ci/run` installs them). When the
//! daemons cannot start, the test fails under CI (env `CI`) with their logs, and says
//! SKIPPED elsewhere. The script's parameters (manifest, model, output folder, binary)
//! reach it through `sbatch --export`; the script itself is not retyped here.
//!
//! Nothing that slurmd runs reads from the checkout (which may sit in a 0700 folder, as
//! `scripts/check-private-checkout` makes it): `diffusionctl`, ONNX Runtime, the model, the
//! manifest and the config are staged in a world-readable temp folder first.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::batch::{
    TestItem, all_files, assert_matches_references, identities, items, leftovers, pngs, references,
    tiny, write_manifest,
};
use common::{copy_dir, root};

/// Shards (array tasks 0..SHARDS).
const SHARDS: usize = 3;
/// Items in the manifest (4 per shard; item 2 makes two images).
const ITEMS: usize = 12;
/// The shard the test preempts.
const PREEMPTED: usize = 1;
/// Denoising steps of the other shards' items, and of the preempted shard's (more, so
/// that it is still running when the test cancels it after its first image).
const STEPS: u32 = 4;
const PREEMPTED_STEPS: u32 = 24;

/// Everything the run needs, where every uid can read it.
struct Stage {
    dir: tempfile::TempDir,
}

impl Stage {
    fn new() -> Stage {
        let dir = tempfile::Builder::new()
            .prefix("diffusiond-slurm-")
            .tempdir()
            .unwrap();
        open_dir(dir.path());
        Stage { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A folder under the stage, mode 0755.
    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        open_dir(&p);
        p
    }
}

/// Mode 0755.
fn open_dir(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A hard link of `from` at `to` (the same file system), else a copy.
fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// The manifest's items: the preempted shard's with more steps than the others.
fn run_items() -> Vec<TestItem> {
    let quick = items(ITEMS, STEPS);
    let slow = items(ITEMS, PREEMPTED_STEPS);
    (0..ITEMS)
        .map(|i| {
            if i % SHARDS == PREEMPTED {
                slow[i].clone()
            } else {
                quick[i].clone()
            }
        })
        .collect()
}

/// The reason this machine cannot run the test, if any.
fn missing_prerequisite() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("needs root (slurmd runs the jobs)".into());
    }
    let tools = [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "scontrol",
        "scancel",
        "squeue",
        "sinfo",
    ];
    let missing: Vec<&str> = tools
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not installed (apt-get install slurm-wlm munge)",
            missing.join(", ")
        )
    })
}

/// Fails under CI, else prints SKIPPED: the test cannot run here.
fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "the Slurm test cannot run under CI: {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// A free TCP port on 127.0.0.1 (free when asked; the daemons bind it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The last `n` lines of a file, for diagnostics.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The daemons' log files (and their stdout and stderr, `*.out`) in the cluster's `log/`.
const DAEMON_LOGS: [&str; 6] = [
    "slurmctld.log",
    "slurmd.log",
    "munged.log",
    "slurmctld.out",
    "slurmd.out",
    "munged.out",
];

/// munged, slurmctld and slurmd of a one-node cluster, configured in `dir`; stopped (with
/// any job of theirs cancelled first) when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    node: String,
    daemons: Vec<(&'static str, Child)>,
    /// The array job, cancelled on drop if it still runs.
    job: Option<String>,
}

impl Cluster {
    /// Writes the config and starts the daemons; `Err` (with the daemons' logs) when the
    /// node does not come up idle.
    fn start(dir: &Path) -> Result<Cluster, String> {
        let node = Command::new("hostname")
            .arg("-s")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .map_err(|e| format!("hostname -s: {e}"))?;
        if node.is_empty() {
            return Err("hostname -s printed nothing".into());
        }
        for d in ["run", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
            open_dir(&dir.join(d));
        }
        // munged wants its key private and its socket's folder open to all (every uid
        // asks it for credentials).
        let key_dir = dir.join("munge");
        std::fs::create_dir_all(&key_dir).unwrap();
        std::fs::set_permissions(&key_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut key = vec![0u8; 1024];
        std::io::Read::read_exact(&mut File::open("/dev/urandom").unwrap(), &mut key).unwrap();
        let key_file = key_dir.join("munge.key");
        std::fs::write(&key_file, key).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let socket = dir.join("run/munge.socket");
        let conf = dir.join("slurm.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "\
# A one-node cluster for tests/slurm.rs, on this machine only.
ClusterName=diffusiond-test
SlurmctldHost={node}(127.0.0.1)
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
# Our own munged, on its own socket (not the system's /run/munge).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: a container often has no writable (or only a v1) cgroup tree, and the
# cgroup plugins fail there. proctrack/linuxproc finds a job's processes through their
# parent pids in /proc (enough for scancel to reach diffusionctl, which the script
# execs), task/none binds nothing, jobacct_gather/none samples nothing. The price is no
# resource enforcement, which a test does not need.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# One CPU per task: two tasks run at once, the third waits.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
# The GPU resource type exists (the script asks for --gres=gpu:1), but this node has
# no GPU: the test submits with --gres=gpu:0.
GresTypes=gpu
ReturnToService=2
KillWait=5
MinJobAge=3600
MailProg=/bin/true
",
                ctld_port = free_port(),
                slurmd_port = free_port(),
                socket = socket.display(),
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: conf.clone(),
            node: node.clone(),
            daemons: Vec::new(),
            job: None,
        };
        cluster.spawn(
            "munged",
            Command::new("munged").args([
                "--foreground".to_string(),
                format!("--socket={}", socket.display()),
                format!("--key-file={}", key_file.display()),
                format!("--log-file={d}/log/munged.log"),
                format!("--pid-file={d}/run/munged.pid"),
                format!("--seed-file={}/munged.seed", key_dir.display()),
            ]),
        )?;
        cluster.wait_for("munged's socket", Duration::from_secs(20), |_| {
            socket.exists()
        })?;
        cluster.spawn(
            "slurmctld",
            Command::new("slurmctld")
                .args(["-D", "-c", "-f"])
                .arg(&conf),
        )?;
        cluster.spawn(
            "slurmd",
            Command::new("slurmd")
                .args(["-D", "-N", &node, "-f"])
                .arg(&conf),
        )?;
        cluster.wait_for("the node to be idle", Duration::from_secs(60), |c| {
            c.client("sinfo")
                .args(["-h", "-N", "-o", "%T"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        })?;
        Ok(cluster)
    }

    /// Starts a daemon with its stdout and stderr in `log/NAME.out`.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> Result<(), String> {
        let out = File::create(self.dir.join(format!("log/{name}.out"))).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.daemons.push((name, child));
        Ok(())
    }

    /// Polls `ready` until it holds; `Err` with the logs when a daemon exits first or
    /// `timeout` passes.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&Cluster) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return Ok(());
            }
            for (name, child) in &mut self.daemons {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("{name} exited ({status}) while waiting for {what}"));
                }
            }
            if Instant::now() > deadline {
                let state = self
                    .client("sinfo")
                    .args(["-h", "-N", "-o", "%N %T %E"])
                    .output()
                    .map(|o| text(&o))
                    .unwrap_or_default();
                return Err(format!(
                    "no {what} after {timeout:?} (sinfo: {})",
                    state.trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A Slurm client command for this cluster.
    fn client(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Runs a client command; panics (with the output) when it fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let o = self.client(program).args(args).output().unwrap();
        assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every task record of `job` (`scontrol -o show job`): array index → fields.
    fn tasks(&self, job: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let out = self.run("scontrol", &["-o", "show", "job", job]);
        out.lines()
            .map(|line| {
                let fields: BTreeMap<String, String> = line
                    .split_whitespace()
                    .filter_map(|f| f.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                (
                    fields.get("ArrayTaskId").cloned().unwrap_or_default(),
                    fields,
                )
            })
            .collect()
    }

    /// The state of one array task (`JobState`).
    fn task_state(&self, job: &str, index: usize) -> String {
        let t = self.tasks(&format!("{job}_{index}"));
        t.values()
            .next()
            .and_then(|f| f.get("JobState").cloned())
            .unwrap_or_default()
    }

    /// The daemons' logs, for a failure message.
    fn logs(&self) -> String {
        DAEMON_LOGS
            .iter()
            .map(|f| format!("--- {f}\n{}\n", tail(&self.dir.join("log").join(f), 30)))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("Slurm logs (node {}):\n{}", self.node, self.logs());
        }
        // Jobs first: their processes are slurmstepd's, which outlive slurmd.
        if let Some(job) = self.job.take() {
            let _ = self.client("scancel").arg(&job).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let running = self
                    .client("squeue")
                    .args(["-h", "-j", &job])
                    .output()
                    .map(|o| !o.stdout.is_empty())
                    .unwrap_or(false);
                if !running {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for (_, child) in self.daemons.iter_mut().rev() {
            if !matches!(child.try_wait(), Ok(None)) {
                continue;
            }
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The files of the items of `shard`.
fn shard_files(items: &[TestItem], shard: usize) -> BTreeSet<String> {
    items
        .iter()
        .enumerate()
        .filter(|(i, _)| i % SHARDS == shard)
        .flat_map(|(_, item)| item.files.clone())
        .collect()
}

/// Which of `files` are in `dir`.
fn present(dir: &Path, files: &BTreeSet<String>) -> Vec<String> {
    files
        .iter()
        .filter(|f| dir.join(f).exists())
        .cloned()
        .collect()
}

#[test]
fn an_array_job_with_a_preempted_task_makes_every_item_once() {
    if let Some(why) = missing_prerequisite() {
        cannot_run(&why);
        return;
    }
    let started = Instant::now();
    let stage = Stage::new();

    // What slurmd's tasks run and read, staged: diffusionctl with ONNX Runtime in
    // ../lib/diffusiond (the installed layout, which it finds first), the model, the
    // manifest and the config.
    let bin = stage.mkdir("bin");
    let ctl = bin.join("diffusionctl");
    link_or_copy(Path::new(env!("CARGO_BIN_EXE_diffusionctl")), &ctl);
    let lib = stage.mkdir("lib/diffusiond");
    for e in std::fs::read_dir(root().join("runtime/lib")).expect("runtime/lib (scripts/setup)") {
        let e = e.unwrap();
        if e.file_name()
            .to_string_lossy()
            .starts_with("libonnxruntime")
        {
            link_or_copy(&e.path(), &lib.join(e.file_name()));
        }
    }
    let model = stage.path("model");
    copy_dir(&tiny(), &model);
    let items = run_items();
    let manifest = write_manifest(stage.dir.path(), &items);
    // One image per UNet run (so the preempted shard's images come one by one), one
    // thread, as the references are made.
    let config = stage.path("cpu.toml");
    std::fs::write(
        &config,
        "[runtime]\nexecution_providers = [\"cpu\"]\n\n\
         [runtime.session]\nintra_threads = 1\ninter_threads = 1\n\n\
         [jobs]\nmax_batch_images = 1\n",
    )
    .unwrap();
    let out = stage.mkdir("out");
    let logs = stage.mkdir("logs");
    for p in std::fs::read_dir(stage.dir.path()).unwrap() {
        let p = p.unwrap().path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }

    let mut cluster = match Cluster::start(&stage.mkdir("slurm")) {
        Ok(c) => c,
        Err(why) => {
            let logs = DAEMON_LOGS
                .iter()
                .map(|f| format!("--- {f}\n{}\n", tail(&stage.path("slurm/log").join(f), 40)))
                .collect::<String>();
            cannot_run(&format!("the Slurm daemons did not start: {why}\n{logs}"));
            return;
        }
    };
    let cluster_up = started.elapsed();

    // The references, made alone by `generate --local` while the array runs.
    let refs_dir = stage.path("refs");
    let refs = {
        let items = items.clone();
        let dir = refs_dir.clone();
        std::thread::spawn(move || references(&dir, &items))
    };

    // Submit the committed script. Its paths come through the environment; the node has
    // 2 CPUs and no GPU, so the script's --cpus-per-task=8 and --gres=gpu:1 are
    // overridden on the command line (which wins over #SBATCH lines).
    let script = root().join("examples/slurm/batch.sbatch");
    let export = format!(
        "ALL,DIFFUSIONCTL={},SD_MANIFEST={},SD_OUTPUT_DIR={},SD_MODEL_DIR={},SD_CONFIG={}",
        ctl.display(),
        manifest.display(),
        out.display(),
        model.display(),
        config.display()
    );
    let submitted = cluster.run(
        "sbatch",
        &[
            "--parsable",
            &format!("--array=0-{}", SHARDS - 1),
            "--gres=gpu:0",
            "--cpus-per-task=1",
            &format!("--chdir={}", logs.display()),
            &format!("--export={export}"),
            script.to_str().unwrap(),
        ],
    );
    let job = submitted.trim().split(';').next().unwrap().to_string();
    assert!(job.parse::<u64>().is_ok(), "sbatch printed {submitted:?}");
    cluster.job = Some(job.clone());
    let task_log = |i: usize| logs.join(format!("sd-batch-{job}_{i}.out"));

    // Preempt one task: once its first image is written, cancel it, then requeue it.
    let files = shard_files(&items, PREEMPTED);
    let deadline = Instant::now() + Duration::from_secs(300);
    while present(&out, &files).is_empty() {
        let state = cluster.task_state(&job, PREEMPTED);
        assert!(
            matches!(state.as_str(), "PENDING" | "RUNNING" | ""),
            "task {PREEMPTED} is {state} before writing an image:\n{}",
            tail(&task_log(PREEMPTED), 40)
        );
        assert!(
            Instant::now() < deadline,
            "task {PREEMPTED} wrote no image in 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let preempted_id = format!("{job}_{PREEMPTED}");
    cluster.run("scancel", &[&preempted_id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = cluster.task_state(&job, PREEMPTED);
        if state == "CANCELLED" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task {PREEMPTED} is {state} 60 s after scancel"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The task's processes are gone: what it finished stays, what it was making is lost.
    let done_before = present(&out, &files);
    assert!(
        done_before.len() < files.len(),
        "task {PREEMPTED} had finished ({done_before:?}) before the cancel reached it"
    );
    let kept = identities(&out, &done_before);
    cluster.run("scontrol", &["requeue", &preempted_id]);
    // A requeued job becomes eligible only after a hold-off (about two minutes in 22.05);
    // a real preemption waits it out, the test starts it 2 s from now. Not at once: slurmd
    // takes a job's credential as revoked when it was issued in the second (or before) the
    // job was killed, and refuses to launch it ("Job credential revoked"; the task fails).
    cluster.run(
        "scontrol",
        &[
            "update",
            &format!("JobId={preempted_id}"),
            "StartTime=now+2",
        ],
    );

    // The whole array ends, every task completed.
    let deadline = Instant::now() + Duration::from_secs(300);
    let tasks = loop {
        let tasks = cluster.tasks(&job);
        // Ended: no task waiting, running or on its way out (Slurm's other states are final).
        let ended = tasks.len() == SHARDS
            && tasks.values().all(|t| {
                !matches!(
                    t.get("JobState").map(String::as_str),
                    None | Some(
                        "PENDING"
                            | "CONFIGURING"
                            | "RUNNING"
                            | "COMPLETING"
                            | "REQUEUED"
                            | "RESIZING"
                            | "SIGNALING"
                            | "STAGE_OUT"
                            | "SUSPENDED"
                    )
                )
            });
        if ended {
            break tasks;
        }
        assert!(
            Instant::now() < deadline,
            "the array did not end in 300 s: {tasks:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let job_seconds = started.elapsed();
    for (index, t) in &tasks {
        let i: usize = index.parse().unwrap();
        assert_eq!(
            (t["JobState"].as_str(), t["ExitCode"].as_str()),
            ("COMPLETED", "0:0"),
            "task {i}:\n{}",
            tail(&task_log(i), 40)
        );
        let restarts = if i == PREEMPTED { "1" } else { "0" };
        assert_eq!(t["Restarts"], restarts, "task {i} restarts");
    }

    // The preempted task ran twice (its log appends), and the second run resumed: it
    // found the images of the first one done.
    let log = std::fs::read_to_string(task_log(PREEMPTED)).unwrap();
    assert!(
        log.contains(&format!(
            "task {PREEMPTED} of {SHARDS} on {}, run 1",
            cluster.node
        )) && log.contains(&format!(
            "task {PREEMPTED} of {SHARDS} on {}, run 2",
            cluster.node
        )),
        "{log}"
    );
    let resumed = log
        .lines()
        .filter(|l| l.starts_with("batch: "))
        .nth(1)
        .unwrap_or_else(|| panic!("no second `batch:` line:\n{log}"));
    // The rerun counts as done what the state recorded: the images present before, but
    // for the one the cancel may have caught between its file's rename and its record (the
    // rerun keeps that file in place: checked below).
    let counts = resumed
        .split_once(&format!("(shard {PREEMPTED}/{SHARDS}), "))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("{resumed}"));
    let number = |word: &str| -> usize {
        counts
            .split([',', ';'])
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no '{word}' count in {resumed}"))
    };
    let (done, to_run) = (number(" done"), number(" to run"));
    let shard_items: Vec<&TestItem> = items
        .iter()
        .enumerate()
        .filter(|(i, _)| i % SHARDS == PREEMPTED)
        .map(|(_, item)| item)
        .collect();
    assert_eq!(done + to_run, shard_items.len(), "{resumed}");
    // Items whose files were all there, and items with any file there, before the requeue.
    let there = |f: &String| done_before.contains(f);
    let complete = shard_items
        .iter()
        .filter(|i| i.files.iter().all(there))
        .count();
    let touched = shard_items
        .iter()
        .filter(|i| i.files.iter().any(there))
        .count();
    assert!(
        complete.saturating_sub(1) <= done && done <= touched,
        "{resumed}: {complete} items complete and {touched} begun before the requeue"
    );

    // Every item exactly once, equal to `generate --local`'s; the images finished before
    // the cancel are the same files; no temporary file anywhere.
    assert_eq!(pngs(&out), all_files(&items));
    assert_eq!(
        identities(&out, &done_before),
        kept,
        "rewritten after the requeue"
    );
    let refs = refs.join().expect("references");
    assert_matches_references(&out, &refs);
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    let mut state: Vec<String> = std::fs::read_dir(out.join(".diffusiond"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sqlite"))
        .collect();
    state.sort();
    assert_eq!(
        state,
        (0..SHARDS)
            .map(|i| format!("batch-{i}-of-{SHARDS}.sqlite"))
            .collect::<Vec<_>>()
    );
    cluster.job = None;
    drop(cluster);
    eprintln!(
        "slurm: cluster up in {:.1} s, array of {SHARDS} with one preemption done in {:.1} s, \
         test {:.1} s in all",
        cluster_up.as_secs_f64(),
        job_seconds.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// docs/fleets.md shows the script this test submits, as it is in the tree.
#[test]
fn the_docs_show_the_tested_script() {
    let script = std::fs::read_to_string(root().join("examples/slurm/batch.sbatch")).unwrap();
    let docs = std::fs::read_to_string(root().join("docs/fleets.md")).unwrap();
    assert!(
        docs.contains(&format!("```bash\n{script}```")),
        "docs/fleets.md does not show examples/slurm/batch.sbatch as it is"
    );
}
