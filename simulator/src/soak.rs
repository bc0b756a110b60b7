//! `neopro-sim soak`: every fault scenario of the CI suite, larger, one after
//! the other, and a table: scenario, played, stored, duplicates, lost,
//! recovery time. A scenario with more to say prints it on the line under
//! its row (`rogue_site`: what the attacker got). Exit code 0 only when
//! every scenario is exact.

use crate::cli::SoakArgs;
use crate::faults::{self, Fault, Outcome, Scale};

pub async fn run(args: SoakArgs) -> anyhow::Result<bool> {
    let scale = Scale::times(args.scale);
    let server = args.fleet.server_url();
    println!(
        "soak: scale {} ({} boxes x {} plays streamed at {:.0}/s, backlog {}, faults of {:.1}s); binaries from {}",
        args.scale,
        scale.sites,
        scale.plays_per_site,
        scale.rate,
        scale.backlog,
        scale.fault_secs,
        faults::bin_dir().display()
    );
    println!("{}", Outcome::header());
    let mut all_exact = true;
    // Without --only: the CI set; opt-in scenarios (pg_restart) by name.
    for f in Fault::ALL.iter().chain(Fault::OPT_IN) {
        let chosen = if args.only.is_empty() {
            Fault::ALL.contains(f)
        } else {
            args.only.iter().any(|o| o == f.name())
        };
        if !chosen {
            continue;
        }
        match faults::run(*f, &server, &scale).await {
            Ok(o) => {
                println!("{}", o.row());
                if !o.note.is_empty() {
                    println!("{}", o.note);
                }
                if !o.exact {
                    print!("{}", o.detail);
                    all_exact = false;
                }
            }
            Err(e) => {
                println!("{:<22} ERROR {e:#}", f.name());
                all_exact = false;
            }
        }
    }
    Ok(all_exact)
}
