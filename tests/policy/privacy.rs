//! Privacy between users through the shipped policy (docs/dbus-api.md, "Privacy"): a
//! group member and an outsider snoop on the bus (`dbus-monitor`: eavesdropping match
//! rules) while another member runs a job and a batch. What she sent or made (prompt,
//! item names, label, errors) must reach neither; her own connections still get every
//! signal; the snooping member's property reads of her work are refused (`GetAll` leaves
//! the owner-only properties out).

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use super::harness::{Account, NAME, OWNER_ONLY, PATH, SystemBus, as_user, cast, make_readable};

const SIGNAL_AGENT_ENV: &str = "DIFFUSIOND_POLICY_SIGNAL_AGENT";
const SECRET_PROMPT: &str = "alice-secret-prompt";
const SECRET_ITEM: &str = "alice-medical-scan-3";
const SECRET_FOLDER: &str = "alice-private-folder";
const JOB: &str = "io.github.Diffusiond1.Job";
const BATCH: &str = "io.github.Diffusiond1.Batch";
const GET: &str = "org.freedesktop.DBus.Properties.Get";
const GET_ALL: &str = "org.freedesktop.DBus.Properties.GetAll";

/// Run as another uid by `a_snooper_receives_nothing_of_another_users_work`: listens for
/// Job signals, generates a job on the same connection, waits for it, and prints its path
/// and how many `Progress` and `Finished` signals of it arrived.
#[test]
fn signal_agent() {
    let Ok(address) = std::env::var(SIGNAL_AGENT_ENV) else {
        return; // Only does something when the privacy test starts it.
    };
    crate::common::tokio_runtime().block_on(async {
        use futures_lite::StreamExt;
        let conn = zbus::connection::Builder::address(address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(JOB)
            .unwrap()
            .build();
        let mut signals = zbus::MessageStream::for_match_rule(rule, &conn, Some(256))
            .await
            .unwrap();
        let request = crate::common::request_dict(&[
            ("prompt", zbus::zvariant::Value::from(SECRET_PROMPT)),
            ("steps", zbus::zvariant::Value::U32(4)),
            ("width", zbus::zvariant::Value::U32(64)),
            ("height", zbus::zvariant::Value::U32(64)),
        ]);
        let job = crate::common::generate(&conn, request).await.unwrap();
        println!("AGENT-JOB {}", job.as_str());
        crate::common::wait(&conn, &job).await.unwrap();
        let (mut progress, mut finished) = (0, 0);
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_secs(2), signals.next()).await
        {
            let header = msg.header();
            if header.path().map(|p| p.as_str()) != Some(job.as_str()) {
                continue;
            }
            match header.member().map(|m| m.as_str()) {
                Some("Progress") => progress += 1,
                Some("Finished") => finished += 1,
                _ => {}
            }
        }
        println!("AGENT-SIGNALS {progress} {finished}");
        std::io::stdout().flush().unwrap();
    });
}

/// Runs [`signal_agent`] as `who`; returns the job's path and the signal counts.
fn run_signal_agent(bus: &SystemBus, who: Account, group: u32) -> (String, u32, u32) {
    let exe = std::env::current_exe().unwrap();
    make_readable(&exe);
    let mut agent = as_user(who, Some(group))
        .arg(&exe)
        .args([
            "--exact",
            "privacy::signal_agent",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGNAL_AGENT_ENV, &bus.address)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut job, mut counts) = (String::new(), None);
    for line in BufReader::new(agent.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // libtest may have started the line ("test privacy::signal_agent ... ").
        if let Some((_, p)) = line.split_once("AGENT-JOB ") {
            job = p.trim().to_string();
        }
        if let Some((_, c)) = line.split_once("AGENT-SIGNALS ") {
            let c: Vec<u32> = c.split_whitespace().map(|n| n.parse().unwrap()).collect();
            counts = Some((c[0], c[1]));
        }
    }
    assert!(agent.wait().unwrap().success(), "the signal agent failed");
    let (progress, finished) = counts.expect("the agent printed no counts");
    (job, progress, finished)
}

#[test]
fn a_snooper_receives_nothing_of_another_users_work() {
    let Some(cast) = cast() else { return };
    let bus = SystemBus::start();
    let _d = bus.start_daemon(cast.service);
    let root = Account { uid: 0, gid: 0 };
    let member_snoop = bus.monitor(cast.bob, Some(cast.group));
    let outsider_snoop = bus.monitor(cast.nobody, None);

    // Alice's job: the connection that made it gets every signal of it.
    let (job, progress, finished) = run_signal_agent(&bus, cast.alice, cast.group);
    assert!(job.starts_with(&format!("{PATH}/job/")), "{job}");
    assert!(
        progress >= 4 && finished == 1,
        "alice's own connection got {progress} Progress and {finished} Finished signals of her 4-step job"
    );
    // Alice's batch: diffusionctl follows it by its signals and copies every image.
    let work = bus.folder_for(cast.alice, "alice");
    let manifest = work.join("scans.jsonl");
    let lines: String = (0..4)
        .map(|i| {
            format!(
                "{{\"name\":\"alice-medical-scan-{i}\",\"prompt\":\"{SECRET_PROMPT}\",\"seed\":{i},\"steps\":4,\"width\":64,\"height\":64}}\n"
            )
        })
        .collect();
    std::fs::write(&manifest, lines).unwrap();
    let out = work.join(SECRET_FOLDER);
    let o = bus.ctl(
        cast.alice,
        Some(cast.group),
        &[
            "batch",
            manifest.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "alice's diffusionctl batch: {said}");
    assert!(out.join(format!("{SECRET_ITEM}.png")).is_file(), "{said}");
    let listed = bus
        .call(
            root,
            None,
            PATH,
            "io.github.Diffusiond1.Manager.ListBatches",
            &[],
        )
        .unwrap();
    let batch = listed
        .split('\'')
        .find(|s| s.starts_with(&format!("{PATH}/batch/")))
        .unwrap_or_else(|| panic!("no batch listed: {listed}"))
        .to_string();

    // Property reads: what alice sent or made is hers (and root's); progress is public.
    let get = |who: Account, group: Option<u32>, path: &str, iface: &str, prop: &str| {
        bus.call(who, group, path, GET, &[iface, prop])
    };
    for (path, iface, props) in [
        (
            &batch,
            BATCH,
            &["Label", "ManifestHash", "BaseSeed", "Owner", "Error"][..],
        ),
        (&job, JOB, &["Request", "Error", "Owner"][..]),
    ] {
        for prop in props {
            let err = get(cast.bob, Some(cast.group), path, iface, prop).unwrap_err();
            assert!(err.contains(OWNER_ONLY), "bob reads {iface}.{prop}: {err}");
            get(cast.alice, Some(cast.group), path, iface, prop)
                .unwrap_or_else(|e| panic!("alice reads {iface}.{prop}: {e}"));
            get(root, None, path, iface, prop)
                .unwrap_or_else(|e| panic!("root reads {iface}.{prop}: {e}"));
        }
        let theirs = bus
            .call(cast.bob, Some(cast.group), path, GET_ALL, &[iface])
            .unwrap();
        assert!(theirs.contains("'State'"), "bob's GetAll: {theirs}");
        for prop in props {
            assert!(
                !theirs.contains(&format!("'{prop}'")),
                "bob's GetAll of {iface} holds {prop}: {theirs}"
            );
        }
        let own = bus
            .call(cast.alice, Some(cast.group), path, GET_ALL, &[iface])
            .unwrap();
        for prop in props {
            assert!(own.contains(&format!("'{prop}'")), "alice's GetAll: {own}");
        }
    }
    let label = get(cast.alice, Some(cast.group), &batch, BATCH, "Label").unwrap();
    assert!(label.contains(SECRET_FOLDER), "{label}");

    // Signals: the member hears that jobs come and go (public), nothing of alice's job or
    // batch; the outsider hears nothing from the daemon at all.
    std::thread::sleep(Duration::from_millis(300));
    let member = member_snoop.stop();
    let outsider = outsider_snoop.stop();
    assert!(
        member.contains("member=JobAdded"),
        "the member's monitor heard no public JobAdded, so it proves nothing:\n{member}"
    );
    for (who, log) in [("bob (member)", &member), ("nobody (outsider)", &outsider)] {
        for private in [
            SECRET_PROMPT,
            SECRET_ITEM,
            SECRET_FOLDER,
            "member=Progress",
            "member=Finished",
            "member=ItemFinished",
            &format!("path={PATH}/job/"),
            &format!("path={PATH}/batch/"),
        ] {
            assert!(
                !log.contains(private),
                "{who} received '{private}' of alice's work:\n{log}"
            );
        }
    }
    assert!(
        outsider.contains("NameOwnerChanged"),
        "the outsider's monitor heard nothing at all, so it proves nothing:\n{outsider}"
    );
    assert!(
        !outsider.contains(&format!("path={PATH}")) && !outsider.contains(NAME),
        "the outsider received something from the daemon:\n{outsider}"
    );
}
