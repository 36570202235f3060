//! Docker's seccomp profile format (`--security-opt seccomp=PROFILE.json`), compiled to a classic
//! BPF program for x86_64.
//!
//! The fields read are those of moby's `profiles/seccomp` types: `defaultAction`,
//! `defaultErrnoRet`, and `syscalls[]` with `names` (or the older `name`), `action`, `errnoRet`,
//! `args` (`index`, `value`, `valueTwo`, `op`) and `includes`/`excludes` (`caps`, `arches`).
//! Rules are tried in the profile's order; a name this architecture does not have is skipped (as
//! libseccomp does); `minKernel` is not checked.

use serde::Deserialize;

use super::syscalls;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid seccomp profile: {0}")]
    Json(#[source] serde_json::Error),
    #[error("seccomp profile: unsupported action {0:?}")]
    Action(String),
    #[error("seccomp profile: unsupported argument operator {0:?}")]
    Op(String),
    #[error("seccomp profile: argument index {0} is out of range (0 to 5)")]
    ArgIndex(u32),
    #[error("seccomp profile: the rule for {0} has too many argument conditions")]
    TooLong(String),
    #[error("seccomp profile: unknown capability {0:?} in includes or excludes")]
    Cap(String),
    #[error(
        "seccomp profile: the filter would have {0} instructions (the kernel takes {MAX_INSNS})"
    )]
    Program(usize),
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    syscalls: Vec<Rule>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<Arg>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

type Insn = (u16, u8, u8, u32);

const LD_W_ABS: u16 = 0x20;
const JEQ: u16 = 0x05 | 0x10;
const JGT: u16 = 0x05 | 0x20;
const JGE: u16 = 0x05 | 0x30;
const AND_K: u16 = 0x04 | 0x50;
const RET: u16 = 0x06;
const JA: u16 = 0x05;
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const ARG0: u32 = 16;

fn action(name: &str, errno: Option<u32>) -> Result<u32, Error> {
    let errno = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match name {
        "SCMP_ACT_ALLOW" => libc::SECCOMP_RET_ALLOW,
        "SCMP_ACT_ERRNO" => libc::SECCOMP_RET_ERRNO | errno,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => libc::SECCOMP_RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => libc::SECCOMP_RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => libc::SECCOMP_RET_TRAP,
        "SCMP_ACT_LOG" => libc::SECCOMP_RET_LOG,
        _ => return Err(Error::Action(name.to_string())),
    })
}

/// A jump target inside one rule: the end of the current condition (it holds) or the end of
/// the rule (it does not).
#[derive(Clone, Copy)]
enum To {
    Next,
    Fail,
    Here,
}

struct Block {
    insns: Vec<Insn>,
    /// (instruction, true branch, false branch)
    jumps: Vec<(usize, To, To)>,
}

impl Block {
    fn ld(&mut self, k: u32) {
        self.insns.push((LD_W_ABS, 0, 0, k));
    }
    fn and(&mut self, k: u32) {
        self.insns.push((AND_K, 0, 0, k));
    }
    fn jmp(&mut self, code: u16, k: u32, t: To, f: To) {
        self.jumps.push((self.insns.len(), t, f));
        self.insns.push((code, 0, 0, k));
    }
    /// Points the jumps to `Next` made since `from` at the current end.
    fn close_next(&mut self, from: usize) -> Result<(), ()> {
        let end = self.insns.len();
        for (i, t, f) in &mut self.jumps {
            if *i < from {
                continue;
            }
            for (to, slot) in [(t, 1), (f, 2)] {
                if matches!(to, To::Next) {
                    let off = u8::try_from(end - *i - 1).map_err(|_| ())?;
                    if slot == 1 {
                        self.insns[*i].1 = off;
                    } else {
                        self.insns[*i].2 = off;
                    }
                    *to = To::Here;
                }
            }
        }
        Ok(())
    }
}

/// One argument condition: falls through (or jumps to `Next`) when it holds, jumps to `Fail`
/// when not.
fn condition(b: &mut Block, a: &Arg) -> Result<(), Error> {
    if a.index > 5 {
        return Err(Error::ArgIndex(a.index));
    }
    let lo = ARG0 + 8 * a.index;
    let hi = lo + 4;
    let (vhi, vlo) = ((a.value >> 32) as u32, a.value as u32);
    match a.op.as_str() {
        "SCMP_CMP_EQ" => {
            b.ld(hi);
            b.jmp(JEQ, vhi, To::Here, To::Fail);
            b.ld(lo);
            b.jmp(JEQ, vlo, To::Here, To::Fail);
        }
        "SCMP_CMP_NE" => {
            b.ld(hi);
            b.jmp(JEQ, vhi, To::Here, To::Next);
            b.ld(lo);
            b.jmp(JEQ, vlo, To::Fail, To::Next);
        }
        "SCMP_CMP_MASKED_EQ" => {
            let (dhi, dlo) = ((a.value_two >> 32) as u32, a.value_two as u32);
            b.ld(hi);
            b.and(vhi);
            b.jmp(JEQ, dhi, To::Here, To::Fail);
            b.ld(lo);
            b.and(vlo);
            b.jmp(JEQ, dlo, To::Here, To::Fail);
        }
        "SCMP_CMP_GT" | "SCMP_CMP_GE" => {
            b.ld(hi);
            b.jmp(JGT, vhi, To::Next, To::Here);
            b.jmp(JEQ, vhi, To::Here, To::Fail);
            b.ld(lo);
            let code = if a.op == "SCMP_CMP_GT" { JGT } else { JGE };
            b.jmp(code, vlo, To::Next, To::Fail);
        }
        "SCMP_CMP_LT" | "SCMP_CMP_LE" => {
            b.ld(hi);
            b.jmp(JGE, vhi, To::Here, To::Next);
            b.jmp(JEQ, vhi, To::Here, To::Fail);
            b.ld(lo);
            // LT: lo >= v fails; LE: lo > v fails.
            let code = if a.op == "SCMP_CMP_LT" { JGE } else { JGT };
            b.jmp(code, vlo, To::Fail, To::Next);
        }
        op => return Err(Error::Op(op.to_string())),
    }
    Ok(())
}

fn cap_bit(name: &str) -> Result<u64, Error> {
    super::cap_index(name)
        .map(|i| 1u64 << i)
        .ok_or_else(|| Error::Cap(name.to_string()))
}

impl Profile {
    pub fn parse(json: &[u8]) -> Result<Profile, Error> {
        let p: Profile = serde_json::from_slice(json).map_err(Error::Json)?;
        // Validate what does not depend on the capabilities now, so a bad profile is refused
        // before anything is created.
        p.compile(u64::MAX)?;
        Ok(p)
    }

    /// The program for a workload whose capabilities are `caps` (rules are included or excluded
    /// by the capabilities they name, as Docker does).
    pub fn compile(&self, caps: u64) -> Result<Vec<Insn>, Error> {
        let default = action(&self.default_action, self.default_errno_ret)?;
        // Each syscall's rules as one run of blocks, in the profile's order (the first rule that
        // matches decides; rules of other syscalls never match, so only their order within one
        // syscall matters).
        let mut by_nr: std::collections::BTreeMap<u32, Vec<Insn>> = Default::default();
        for r in &self.syscalls {
            let act = action(&r.action, r.errno_ret)?;
            let mut inc = 0;
            for c in &r.includes.caps {
                inc |= cap_bit(c)?;
            }
            let mut exc = 0;
            for c in &r.excludes.caps {
                exc |= cap_bit(c)?;
            }
            let arch_ok = |a: &str| matches!(a, "amd64" | "x86_64" | "SCMP_ARCH_X86_64");
            if caps & inc != inc
                || caps & exc != 0
                || (!r.includes.arches.is_empty() && !r.includes.arches.iter().any(|a| arch_ok(a)))
                || r.excludes.arches.iter().any(|a| arch_ok(a))
            {
                continue;
            }
            for name in r.names.iter().chain(&r.name) {
                let Some(nr) = syscalls::number(name) else {
                    continue;
                };
                by_nr
                    .entry(nr)
                    .or_default()
                    .extend(rule_block(nr, &r.args, act, name)?);
            }
        }
        let mut prog: Vec<Insn> = vec![
            (LD_W_ABS, 0, 0, 4),
            (JEQ, 1, 0, AUDIT_ARCH_X86_64),
            (RET, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
            (LD_W_ABS, 0, 0, 0),
        ];
        let groups: Vec<(u32, Vec<Insn>)> = by_nr.into_iter().collect();
        search(&groups, default, &mut prog);
        if prog.len() > MAX_INSNS {
            return Err(Error::Program(prog.len()));
        }
        Ok(prog)
    }
}

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// How many syscalls' rules a leaf of the search checks one after the other.
const LEAF: usize = 4;

/// One rule for syscall `nr`: load the number, compare, the argument conditions, the action; a
/// test that fails jumps past the block (to the next rule, or the leaf's default).
fn rule_block(nr: u32, args: &[Arg], act: u32, name: &str) -> Result<Vec<Insn>, Error> {
    let mut b = Block {
        insns: vec![(LD_W_ABS, 0, 0, 0)],
        jumps: Vec::new(),
    };
    b.jmp(JEQ, nr, To::Here, To::Fail);
    for a in args {
        let from = b.insns.len();
        condition(&mut b, a)?;
        b.close_next(from)
            .map_err(|_| Error::TooLong(name.to_string()))?;
    }
    b.insns.push((RET, 0, 0, act));
    let end = b.insns.len();
    for (i, t, f) in &b.jumps {
        for (to, slot) in [(t, 1), (f, 2)] {
            if matches!(to, To::Fail) {
                let off =
                    u8::try_from(end - i - 1).map_err(|_| Error::TooLong(name.to_string()))?;
                if slot == 1 {
                    b.insns[*i].1 = off;
                } else {
                    b.insns[*i].2 = off;
                }
            }
        }
    }
    Ok(b.insns)
}

/// A binary search on the syscall number (in A) down to leaves of [`LEAF`] syscalls, instead of
/// one long chain: a syscall is decided after ~2·log2(n) instructions rather than up to 2·n.
/// That matters where the filter is interpreted (a guest kernel without a BPF JIT evaluates it
/// for every syscall number when it is installed, to build its cache, and for every call the
/// cache cannot answer). Each node is `jge pivot` falling through to a long jump to the upper
/// half, or skipping it into the lower half.
fn search(groups: &[(u32, Vec<Insn>)], default: u32, prog: &mut Vec<Insn>) {
    if groups.len() <= LEAF {
        for (_, block) in groups {
            prog.extend_from_slice(block);
        }
        prog.push((RET, 0, 0, default));
        return;
    }
    let mid = groups.len() / 2;
    let node = prog.len();
    prog.push((JGE, 0, 1, groups[mid].0));
    prog.push((JA, 0, 0, 0));
    search(&groups[..mid], default, prog);
    prog[node + 1].3 = (prog.len() - node - 2) as u32;
    search(&groups[mid..], default, prog);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Runs the program on (nr, args): the verdict.
    fn run(prog: &[Insn], nr: u32, args: [u64; 6]) -> u32 {
        run_counted(prog, nr, args).0
    }

    /// The verdict, and how many instructions gave it.
    fn run_counted(prog: &[Insn], nr: u32, args: [u64; 6]) -> (u32, usize) {
        let word = |k: u32| -> u32 {
            match k {
                0 => nr,
                4 => AUDIT_ARCH_X86_64,
                k => {
                    let i = ((k - ARG0) / 8) as usize;
                    if (k - ARG0) % 8 == 0 {
                        args[i] as u32
                    } else {
                        (args[i] >> 32) as u32
                    }
                }
            }
        };
        let (mut pc, mut acc, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let (code, jt, jf, k) = prog[pc];
            pc += 1;
            steps += 1;
            match code {
                LD_W_ABS => acc = word(k),
                AND_K => acc &= k,
                JA => pc += k as usize,
                JEQ | JGT | JGE => {
                    let hit = match code {
                        JEQ => acc == k,
                        JGT => acc > k,
                        _ => acc >= k,
                    };
                    pc += usize::from(if hit { jt } else { jf });
                }
                RET => return (k, steps),
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn docker_format_rules_and_arguments() {
        let p = Profile::parse(
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir","no_such_call"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                {"names":["personality"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":8,"op":"SCMP_CMP_NE"}]},
                {"names":["socket"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":40,"op":"SCMP_CMP_EQ"}]},
                {"names":["clone"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
                {"names":["dup"],"action":"SCMP_ACT_ERRNO","args":[{"index":1,"value":4294967296,"op":"SCMP_CMP_GE"}]},
                {"names":["dup2"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":5,"op":"SCMP_CMP_LT"}]},
                {"names":["reboot"],"action":"SCMP_ACT_KILL_PROCESS","includes":{"caps":["CAP_SYS_BOOT"]}}
            ]}"#,
        )
        .unwrap();
        let prog = p.compile(0).unwrap();
        let e = |n: u32| libc::SECCOMP_RET_ERRNO | n;
        let allow = libc::SECCOMP_RET_ALLOW;
        let nr = |n: &str| syscalls::number(n).unwrap();
        assert_eq!(run(&prog, nr("mkdir"), [0; 6]), e(13));
        assert_eq!(run(&prog, nr("getpid"), [0; 6]), allow);
        assert_eq!(run(&prog, nr("personality"), [8, 0, 0, 0, 0, 0]), allow);
        assert_eq!(run(&prog, nr("personality"), [9, 0, 0, 0, 0, 0]), e(1));
        assert_eq!(
            run(&prog, nr("personality"), [8 | 1 << 32, 0, 0, 0, 0, 0]),
            e(1)
        );
        assert_eq!(run(&prog, nr("socket"), [40, 0, 0, 0, 0, 0]), e(1));
        assert_eq!(run(&prog, nr("socket"), [2, 0, 0, 0, 0, 0]), allow);
        assert_eq!(run(&prog, nr("clone"), [0x11, 0, 0, 0, 0, 0]), e(1));
        assert_eq!(run(&prog, nr("clone"), [0x2000_0000, 0, 0, 0, 0, 0]), allow);
        assert_eq!(run(&prog, nr("dup"), [0, 1 << 32, 0, 0, 0, 0]), e(1));
        assert_eq!(run(&prog, nr("dup"), [0, 7, 0, 0, 0, 0]), allow);
        assert_eq!(run(&prog, nr("dup2"), [4, 0, 0, 0, 0, 0]), e(1));
        assert_eq!(run(&prog, nr("dup2"), [5, 0, 0, 0, 0, 0]), allow);
        // Included only with CAP_SYS_BOOT.
        assert_eq!(run(&prog, nr("reboot"), [0; 6]), allow);
        let with_boot = p.compile(1 << 22).unwrap();
        assert_eq!(
            run(&with_boot, nr("reboot"), [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    /// What the rules say, read directly (the first rule for the call whose capabilities and
    /// arguments match decides).
    fn verdict(p: &Profile, caps: u64, nr: u32, args: [u64; 6]) -> u32 {
        for r in &p.syscalls {
            let mask = |names: &[String]| names.iter().fold(0u64, |m, c| m | cap_bit(c).unwrap());
            let (inc, exc) = (mask(&r.includes.caps), mask(&r.excludes.caps));
            if caps & inc != inc || caps & exc != 0 {
                continue;
            }
            if !r
                .names
                .iter()
                .chain(&r.name)
                .any(|n| syscalls::number(n) == Some(nr))
            {
                continue;
            }
            let holds = |a: &Arg| {
                let v = args[a.index as usize];
                match a.op.as_str() {
                    "SCMP_CMP_EQ" => v == a.value,
                    "SCMP_CMP_NE" => v != a.value,
                    "SCMP_CMP_MASKED_EQ" => v & a.value == a.value_two,
                    "SCMP_CMP_GT" => v > a.value,
                    "SCMP_CMP_GE" => v >= a.value,
                    "SCMP_CMP_LT" => v < a.value,
                    _ => v <= a.value,
                }
            };
            if r.args.iter().all(holds) {
                return action(&r.action, r.errno_ret).unwrap();
            }
        }
        action(&p.default_action, p.default_errno_ret).unwrap()
    }

    /// A profile of every known syscall (as large as Docker's or podman's), some with argument
    /// conditions, some by capability, some named by two rules: the search decides every call
    /// as the rules do, in a fraction of the instructions of a chain.
    #[test]
    fn the_search_decides_as_the_rules_do() {
        let ops = [
            "SCMP_CMP_EQ",
            "SCMP_CMP_NE",
            "SCMP_CMP_GT",
            "SCMP_CMP_GE",
            "SCMP_CMP_LT",
            "SCMP_CMP_LE",
            "SCMP_CMP_MASKED_EQ",
        ];
        let mut rules = Vec::new();
        for (i, (name, _)) in syscalls::SYSCALLS.iter().enumerate() {
            let op = ops[i % ops.len()];
            rules.push(match i % 4 {
                0 => serde_json::json!({"names": [name], "action": "SCMP_ACT_ALLOW"}),
                1 => serde_json::json!({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": i % 90 + 1,
                    "args": [{"index": i % 6, "value": 7, "valueTwo": 3, "op": op}]}),
                2 => serde_json::json!({"names": [name], "action": "SCMP_ACT_ALLOW",
                    "includes": {"caps": ["CAP_SYS_ADMIN"]}}),
                _ => serde_json::json!({"names": [name], "action": "SCMP_ACT_KILL_PROCESS",
                    "excludes": {"caps": ["CAP_NET_ADMIN"]}}),
            });
        }
        for (i, (name, _)) in syscalls::SYSCALLS.iter().enumerate().step_by(3) {
            rules.push(
                serde_json::json!({"names": [name], "action": "SCMP_ACT_LOG",
                "args": [{"index": 0, "value": i as u64, "op": "SCMP_CMP_LE"}]}),
            );
        }
        let json = serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules});
        let p = Profile::parse(json.to_string().as_bytes()).unwrap();
        let probes: [[u64; 6]; 5] = [
            [0; 6],
            [7; 6],
            [3, 3, 3, 3, 3, 3],
            [8, 1 << 32, 6, 15, 7 | 1 << 40, u64::MAX],
            [500, 0, 7, 0, 7, 0],
        ];
        for caps in [0, 1 << 21, 1 << 12, (1 << 21) | (1 << 12)] {
            let prog = p.compile(caps).unwrap();
            for nr in 0..520 {
                for args in probes {
                    assert_eq!(
                        run(&prog, nr, args),
                        verdict(&p, caps, nr, args),
                        "caps {caps:#x}, nr {nr}, args {args:?}"
                    );
                }
            }
        }
        // A call is decided in few instructions: count them for one past the last call in the
        // table (no rule: the whole search, then the default).
        let prog = p.compile(0).unwrap();
        let last = syscalls::SYSCALLS.iter().map(|(_, n)| *n).max().unwrap();
        let (_, steps) = run_counted(&prog, last + 1, [0; 6]);
        assert!(steps < 40, "{steps} instructions for a call with no rule");
    }

    #[test]
    fn bad_profiles_are_refused() {
        for bad in [
            &br#"{"syscalls":[]}"#[..],
            br#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":7,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_XX"}]}]}"#,
            b"not json",
        ] {
            let e = Profile::parse(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn syscall_table_is_sorted() {
        assert!(syscalls::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscalls::number("read"), Some(0));
        assert_eq!(syscalls::number("mount"), Some(165));
        assert_eq!(syscalls::number("nope"), None);
    }
}
