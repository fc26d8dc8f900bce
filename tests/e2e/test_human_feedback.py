"""People in the loop, on the production topology (api-server, scheduler, Celery workers,
MLflow): a labelling run answered through the REST API as a labeller's script would, one
request answered in the browser, the store and its provenance, the asset event that
queues retraining, training reading the labels, the champion gate (promote, reject,
time-out) and the bad inputs that must be refused.

No pipeline is trained here: the pairs come from the tiny built-in model, and the gate's
candidates are registered from a run directory holding that model (evaluate's metrics
written by the test), through the real register stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.e2e.conftest import UI_TIMEOUT_MS, keep_artifact
from tests.e2e.topology import ApiError, Topology, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABEL_DAG, GATE_DAG = "rlhf_label_preferences", "rlhf_champion_approval"
GATE_MODEL = "rlhf-e2e-gate"  # a registered model of its own: the pipeline tests move rlhf-tiny-actor's alias
RUN_TIMEOUT_S = 600
# Three prompts, two labellers each (copy k of pair i goes to labeller (i + k) mod 2).
LABEL_CONF = {"pairs": 3, "model": "builtin:tiny-opt", "compare_with": "self", "prompts": "held-out",
              "labellers": ["alice", "bob"], "labels_per_pair": 2, "max_new_tokens": 24}


def hitl_path(run_id: str, map_index: int, dag_id: str = LABEL_DAG, task_id: str = "label") -> str:
    return (f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}/{map_index}"
            "/hitlDetails")


def waiting_requests(topo: Topology, run_id: str, n: int, dag_id: str = LABEL_DAG) -> dict[int, dict]:
    """The run's human-in-the-loop requests by map index, once ``n`` of them wait for a person."""

    def parked() -> dict[int, dict] | None:
        details = topo.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/hitlDetails")
        waiting = {d["task_instance"]["map_index"]: d for d in details["hitl_details"]
                   if d["task_instance"]["state"] == "awaiting_input"}
        failed = [t for t in topo.task_instances(run_id, dag_id).values() if t["state"] in ("failed", "upstream_failed")]
        if failed:
            raise AssertionError(f"tasks failed: {failed}\n{topo.run_report(run_id, dag_id)}")
        return waiting if len(waiting) >= n else None

    return wait_until(f"{n} requests of {run_id} waiting", parked, RUN_TIMEOUT_S, 3.0,
                      on_timeout=lambda: topo.run_report(run_id, dag_id))


def answer(topo: Topology, run_id: str, map_index: int, choice: str, user: str, **kw) -> dict:
    return topo.api("PATCH", hitl_path(run_id, map_index, **kw), {"chosen_options": [choice]}, user=user)


def refused(topo: Topology, run_id: str, map_index: int, choice: str, user: str) -> ApiError:
    with pytest.raises(ApiError) as err:
        answer(topo, run_id, map_index, choice, user)
    return err.value


@pytest.fixture(scope="module")
def dags(topology: Topology) -> Topology:
    for dag_id in (LABEL_DAG, GATE_DAG):
        topology.wait_for_dag(dag_id=dag_id)
        topology.unpause(dag_id)
    return topology


@pytest.fixture(scope="module")
def labelling(dags: Topology, browser, tmp_path_factory, artifacts_dir) -> dict:
    """One labelling run: answered over REST by alice and bob, one request in the browser."""
    topo, t0 = dags, time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    run_id = topo.trigger(LABEL_CONF, f"e2e_labels_{time.strftime('%Y%m%dT%H%M%S')}", dag_id=LABEL_DAG)
    reqs = waiting_requests(topo, run_id, 6)
    assigned = {i: [u["id"] for u in d["assigned_users"]] for i, d in reqs.items()}
    out: dict = {"run_id": run_id, "requests": reqs, "assigned": assigned, "started": started}
    # A user who is not assigned is refused; nothing is recorded.
    out["intruder"] = refused(topo, run_id, 0, "A better", "mallory")
    # pair 0 (maps 0, 1): both prefer A -> agree; pair 1 (2, 3): alice A, bob Tie -> disagree;
    # pair 2 (4, 5): alice answers in the browser (A better), bob skips.
    plan = {0: "A better", 1: "A better", 2: "A better", 3: "Tie", 5: "Skip"}
    for i, choice in plan.items():
        answer(topo, run_id, i, choice, assigned[i][0])
    out["second_answer"] = refused(topo, run_id, 0, "B better", assigned[0][0])
    out["browser"] = label_in_browser(topo, browser, run_id, 4, assigned[4][0], reqs[4],
                                      tmp_path_factory.mktemp("hitl-shots"), artifacts_dir)
    out["run"] = topo.wait_for_run(run_id, RUN_TIMEOUT_S, dag_id=LABEL_DAG)
    out["elapsed"] = time.monotonic() - t0
    print(f"\nlabelling run {run_id}: {out['run']['state']} in {out['elapsed']:.0f} s")
    return out


def label_in_browser(topo: Topology, browser, run_id: str, map_index: int, user: str, req: dict,
                     shots_dir: Path, artifacts_dir: Path) -> dict:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    # The UI's page of one mapped task instance's request (the link its Required Actions list gives).
    url = (f"{topo.api_url}/dags/{LABEL_DAG}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/label/mapped/"
           f"{map_index}/required_actions")
    try:
        page.goto(url)
        page.wait_for_url("**/auth/login**")
        page.get_by_label("Username").fill(user)
        page.get_by_label("Password").fill(topo.passwords[user])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/required_actions**")
        body = req["body"]
        answers = [block.split("\n", 1)[1].rsplit("\n", 1)[0] for block in body.split("```text")[2:4]]
        for text in answers:  # both answers are on the page, in the order shown
            expect(page.get_by_text(" ".join(text.split()[:3])).first).to_be_visible(timeout=UI_TIMEOUT_MS)
        shot = shots_dir / "hitl-01-labelling-request.png"
        page.screenshot(path=str(shot), full_page=True)
        kept = [keep_artifact(shot, artifacts_dir)]
        # Five options: the UI offers them in a select (preset to the default, Skip), then Respond.
        page.get_by_role("combobox").first.click()
        page.get_by_role("option", name="A better").click()
        shot = shots_dir / "hitl-02-labelling-choice.png"
        page.screenshot(path=str(shot), full_page=True)
        kept.append(keep_artifact(shot, artifacts_dir))
        page.get_by_role("button", name="Respond").click()
        detail = wait_until("the browser's answer recorded", lambda: (d := topo.api("GET", hitl_path(run_id, map_index)))
                            ["response_received"] and d, 60, 1.0)
        page.reload()
        expect(page.get_by_text("A better").first).to_be_visible(timeout=UI_TIMEOUT_MS)
        shot = shots_dir / "hitl-03-labelling-answered.png"
        page.screenshot(path=str(shot), full_page=True)
        kept.append(keep_artifact(shot, artifacts_dir))
        return {"detail": detail, "screenshots": kept}
    except Exception:
        page.screenshot(path=str(artifacts_dir / "hitl-failure.png"), full_page=True)
        raise
    finally:
        context.close()


def store_file(topo: Topology, run_id: str) -> Path:
    from rlhf_tasks.feedback.store import batch_name

    return topo.storage / "preferences" / "human" / f"{batch_name(run_id)}.jsonl"


def test_labels_answered_over_rest_and_in_the_browser_land_in_the_store(labelling, dags):
    assert labelling["run"]["state"] == "success", dags.run_report(labelling["run_id"], LABEL_DAG)
    assigned = labelling["assigned"]
    assert [assigned[i] for i in range(6)] == [["alice"], ["bob"], ["bob"], ["alice"], ["alice"], ["bob"]]
    body = labelling["requests"][0]["body"]
    assert body.count("```text") == 3 and "### Answer A" in body and "### Answer B" in body
    assert labelling["requests"][0]["options"] == ["A better", "B better", "Tie", "Both bad", "Skip"]
    browser_answer = labelling["browser"]["detail"]
    assert browser_answer["chosen_options"] == ["A better"] and browser_answer["responded_by_user"]["id"] == "alice"
    assert all(p.stat().st_size > 10_000 for p in labelling["browser"]["screenshots"])

    rows = [json.loads(x) for x in store_file(dags, labelling["run_id"]).read_text().splitlines()]
    assert len(rows) == 4  # maps 0, 1, 2 and 4 preferred an answer; the tie and the skip are not rows
    assert sorted(r["labeller"] for r in rows) == ["alice", "alice", "bob", "bob"]
    for r in rows:
        assert r["dag_run_id"] == labelling["run_id"] and r["task_id"] == "label"
        assert r["choice"] == "A better" and r["chosen_model"] == r["shown_a"] and r["rejected_model"] == r["shown_b"]
        assert r["prompt"].rstrip().endswith("Assistant:") and r["chosen"] != r["rejected"]
        assert r["labelled_at"] >= labelling["started"][:10]
    summary = json.loads((dags.storage / "preferences" / "batches" / f"{store_file(dags, labelling['run_id']).stem}"
                          ".json").read_text())
    assert (summary["labelled"], summary["ties"], summary["skipped"], summary["requests"]) == (4, 1, 1, 6)
    assert summary["per_labeller"] == {"alice": 3, "bob": 3}
    assert summary["agreement"] == {"pairs_judged_twice": 2, "comparisons": 2, "agreement": 0.5}


def test_a_second_answer_and_an_unassigned_user_are_refused(labelling):
    assert labelling["intruder"].status == 403 and "mallory" in str(labelling["intruder"])
    assert labelling["second_answer"].status == 409 and "not allowed to write again" in str(labelling["second_answer"])


def test_the_batch_is_in_mlflow_with_its_counts(labelling, dags):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(dags.mlflow_url)
    exp = client.get_experiment_by_name("rlhf-tiny-cpu")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`rlhf.kind` = 'labelling' and "
                                f"tags.`airflow.run_id` = '{labelling['run_id']}'")
    m = run.data.metrics
    assert (m["labels/labelled"], m["labels/ties"], m["labels/skipped"], m["labels/agreement"]) == (4, 1, 1, 0.5)
    assert (m["labels/by/alice"], m["labels/by/bob"]) == (3, 3)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name.startswith("human:") and inp.tags[0].value == "human-preferences"


def test_the_asset_event_queues_retraining(labelling, dags):
    events = dags.api("GET", f"/assets/events?source_dag_id={LABEL_DAG}&source_run_id="
                      f"{urllib.parse.quote(labelling['run_id'], safe='')}")["asset_events"]
    assert [e["extra"]["rows"] for e in events] == [4]
    assert events[0]["extra"]["path"] == str(store_file(dags, labelling["run_id"]))

    def retrain_run() -> dict | None:
        for r in dags.dag_runs():
            if r["run_type"] == "asset_triggered":
                consumed = dags.api("GET", f"/dags/rlhf_pipeline/dagRuns/"
                                    f"{urllib.parse.quote(r['dag_run_id'], safe='')}/upstreamAssetEvents")
                if events[0]["id"] in [e["id"] for e in consumed["asset_events"]]:
                    return r
        return None

    run = wait_until("an asset-triggered rlhf_pipeline run", retrain_run, 120, 3.0)
    # This test checks the trigger, not the training: stop the run, free the pipeline's slot.
    dags.api("PATCH", f"/dags/rlhf_pipeline/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}",
             {"state": "failed"})


def test_training_reads_the_labels_and_mlflow_counts_them(labelling, dags, tmp_path):
    """The prepare stage (the pipeline's install task) with ``human`` among the datasets:
    the labelled pairs are validated and mixed into the RM's share; the count is in MLflow."""
    from mlflow.tracking import MlflowClient

    run_dir = dags.storage / "runs" / f"e2e_human_{time.strftime('%H%M%S')}"
    env = {**dags.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # data_split 1,8,1: of the 4 labelled pairs (all training rows: 4 x 0.9 rounds to 4), the RM
    # phase gets rint(0.9 x 4) - rint(0.1 x 4) = 4 - 0 = 4.
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks", "prepare", "--preset", "tiny-cpu", "--output",
                           str(run_dir), "--set", "data.datasets=[sample:Dahoas/rm-static, human]",
                           "--set", "data.data_split=1,8,1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RLHF_RESULT "))
    assert result["human_pairs"] == 4
    client = MlflowClient(dags.mlflow_url)
    parent = client.get_run(result["mlflow_parent_run_id"])
    assert parent.data.params["data/human_pairs"] == "4"


# -- the champion gate -------------------------------------------------------------------

def candidate_run(topo: Topology, name: str, ppo_reward: float, timeout_min: float, model_dir: Path) -> str:
    """A run directory as evaluate leaves it (the built-in model as SFT and PPO actor,
    metrics set here), registered by the real register stage with human approval."""
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.pipeline import register
    from rlhf_tasks.storage import RunDir, StageResult, run_dir_for

    run = RunDir(run_dir_for(name, topo.storage))
    cfg = PipelineConfig.load("tiny-cpu", ["tracking.champion_approval=human", f"tracking.registered_model={GATE_MODEL}",
                                           f"tracking.approval_timeout_minutes={timeout_min}"])
    cfg.save(run.config_path)
    for stage in ("sft", "ppo"):
        shutil.copytree(model_dir, run.final(stage))
    metrics = {"aligned_reward": ppo_reward, "sft_reward": 0.25, "kl_aligned_sft": 1.5, "aligned_win_rate": 0.7,
               "prompts": 8}
    run.result_path("evaluate").parent.mkdir(parents=True, exist_ok=True)
    run.result_path("evaluate").write_text(StageResult("evaluate", str(run.final("ppo")), metrics,
                                                       wall_clock_s=60.0).to_json())
    (run.path / "evaluate" / "samples.json").write_text(json.dumps([
        {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "sft_answer": "Blue.", "sft_reward": 0.1,
         "ppo_answer": "Green, like grass.", "ppo_reward": 0.9}]))
    os.environ["MLFLOW_TRACKING_URI"] = topo.mlflow_url
    try:
        reg = register.run(cfg, run)["registered"]
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert reg["approval"] == "pending"
    return name


def champion(topo: Topology) -> str | None:
    from mlflow.tracking import MlflowClient

    aliases = MlflowClient(topo.mlflow_url).get_registered_model(GATE_MODEL).aliases
    return aliases.get("champion")


def version_tags(topo: Topology, version: str) -> dict:
    from mlflow.tracking import MlflowClient

    return MlflowClient(topo.mlflow_url).get_model_version(GATE_MODEL, version).tags


@pytest.fixture(scope="module")
def gate(dags: Topology, tiny_model_dir) -> dict:
    """Three candidates: v1 promoted by the admin, v2 rejected, v3 left to time out (6 s)."""
    topo, out = dags, {}
    for name, choice, reward, timeout_min in (("e2e_gate_promote", "Promote", 1.0, 60.0),
                                              ("e2e_gate_reject", "Reject", 2.0, 60.0),
                                              ("e2e_gate_timeout", None, 3.0, 0.1)):
        candidate_run(topo, name, reward, timeout_min, tiny_model_dir)
        before = champion(topo)
        run_id = topo.trigger({"pipeline_run_id": name}, f"approve__{name}", dag_id=GATE_DAG)
        (req,) = waiting_requests(topo, run_id, 1, dag_id=GATE_DAG).values()
        if choice:
            answer(topo, run_id, -1, choice, topo.admin_user, dag_id=GATE_DAG, task_id="decide")
        run = topo.wait_for_run(run_id, RUN_TIMEOUT_S, dag_id=GATE_DAG)
        out[name] = {"run": run, "request": req, "before": before, "after": champion(topo),
                     "report": (topo.storage / "runs" / name / "report.md").read_text()}
    return out


def test_promote_moves_the_champion(gate, dags):
    g = gate["e2e_gate_promote"]
    assert g["run"]["state"] == "success", dags.run_report(g["run"]["dag_run_id"], GATE_DAG)
    assert (g["before"], g["after"]) == (None, "1")
    body = g["request"]["body"]
    assert "| average reward (held-out) | 1.000 | – | 0.250 |" in body and "Green, like grass." in body
    tags = version_tags(dags, "1")
    assert (tags["rlhf.approval"], tags["rlhf.approval.by"]) == ("promoted", "admin") and tags["rlhf.approval.at"]
    assert "Approval `promoted`" in g["report"] and "by admin" in g["report"]


def test_reject_keeps_the_champion(gate, dags):
    g = gate["e2e_gate_reject"]
    assert g["run"]["state"] == "success", dags.run_report(g["run"]["dag_run_id"], GATE_DAG)
    assert (g["before"], g["after"]) == ("1", "1")
    # The request compares with the champion's numbers, read from its version's tags.
    assert "| average reward (held-out) | 2.000 | 1.000 | 0.250 |" in g["request"]["body"]
    assert version_tags(dags, "2")["rlhf.approval"] == "rejected"
    assert "Approval `rejected`" in g["report"]


def test_no_answer_within_the_timeout_keeps_the_champion(gate, dags):
    g = gate["e2e_gate_timeout"]
    assert g["run"]["state"] == "success", dags.run_report(g["run"]["dag_run_id"], GATE_DAG)
    assert (g["before"], g["after"]) == ("1", "1")
    tags = version_tags(dags, "3")
    assert (tags["rlhf.approval"], tags["rlhf.approval.by"]) == ("timed_out", "")
    assert "nobody (timed out)" in g["report"]


# -- bad input: refused before anything is generated, nothing written ---------------------

def test_an_empty_prompt_file_and_an_unknown_alias_are_refused(dags, gate, tmp_path):
    empty = dags.storage / "empty-prompts.txt"
    empty.write_text("\n  \n")
    good = dags.storage / "prompts.txt"
    good.write_text("Name a colour.\n")
    before = sorted((dags.storage / "preferences" / "human").glob("*.jsonl"))
    cases = {"empty": ({**LABEL_CONF, "prompts": str(empty)}, f"prompt file {empty} holds no prompt"),
             "alias": ({**LABEL_CONF, "prompts": str(good), "model": "no-such-alias",
                        "overrides": [f"tracking.registered_model={GATE_MODEL}"]},
                       f"registered model '{GATE_MODEL}' has no alias 'no-such-alias'; its aliases: ['champion']")}
    runs = {k: dags.trigger(conf, f"e2e_bad_{k}_{time.strftime('%H%M%S')}", dag_id=LABEL_DAG)
            for k, (conf, _) in cases.items()}
    for k, run_id in runs.items():
        run = dags.wait_for_run(run_id, RUN_TIMEOUT_S, dag_id=LABEL_DAG)
        tis = dags.task_instances(run_id, LABEL_DAG)
        assert run["state"] == "failed" and tis["generate"]["state"] == "failed", tis
        assert tis["generate"]["try_number"] == 1  # refused for good, no retry
        assert cases[k][1] in dags.task_log_tails(run_id, 200, dag_id=LABEL_DAG)
        assert not store_file(dags, run_id).exists()
    assert sorted((dags.storage / "preferences" / "human").glob("*.jsonl")) == before
