"""Every path a campaign keeps beside its videos under the output root, in one place.

{output}/{row}.mp4          the videos (a row's `output` column may put one elsewhere)
{output}/_results.parquet   one row per manifest row (heygem_ray.results), written at the end
{output}/_results/part-*.parquet  results written as rows finish, removed once the table is written
{output}/_report.html       the page operators open (heygem_ray.report)
{output}/_report/page-NNNN.html  its rows, 500 a page, for a campaign of more than 500 rows
{output}/_progress.json     the campaign's progress for other tools to poll (heygem_ray.progress)
{output}/_config.yaml       the resolved config of the last run, credentials masked
{output}/_markers/{row}.json    a finished row's fingerprint: a rerun skips the row
{output}/_thumbs/{row}.jpg      a finished row's thumbnail, for the report
{output}/_work/{key}/       segments of rows in progress, removed once stitched (and a finished
                            row's folders of earlier cuts or inputs, at the campaign's end)
{output}/_cache/            decoded audio and face tracks, unless `cache` puts them elsewhere
{output}/_lock.json         held by the run writing the output root (heygem_ray.output_lock)
{output}/_force.json        the runs of a `force=true` rerun not yet whole (a forced rerun resumes it)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from heygem_ray.storage import info, is_local, join, local_path

#: the names the campaign's own files take directly under the output root: no video may
RESERVED = (
    "_results.parquet",
    "_results",
    "_report.html",
    "_report",
    "_progress.json",
    "_config.yaml",
    "_markers",
    "_thumbs",
    "_work",
    "_cache",
    "_lock.json",
    "_force.json",
)


@dataclass(frozen=True)
class CampaignLayout:
    output: str
    #: where decoded audio and face tracks go; None = {output}/_cache
    cache_root: str | None = None

    def folders_in_the_way(self) -> list[str]:
        """The campaign's own files that are folders on a local output root (a copy gone wrong, a
        tool that made `_results.parquet` a dataset folder): each run failed at the first write and
        said to run again, which failed the same way."""
        files = (self.results, self.report, self.progress, self.config, self.forced)
        return [uri for uri in files if is_local(uri) and os.path.isdir(local_path(uri))]

    def root_is_a_file(self) -> bool:
        """Whether the output root is a file (an `output=` that names a video; in an object store,
        a key the campaign's files would make a folder of as well)."""
        if is_local(self.output):
            return os.path.isfile(local_path(self.output))
        try:
            return info(self.output).get("type") == "file"
        except FileNotFoundError:
            return False

    @property
    def results(self) -> str:
        return join(self.output, "_results.parquet")

    @property
    def lock(self) -> str:
        return join(self.output, "_lock.json")

    @property
    def results_parts(self) -> str:
        return join(self.output, "_results")

    @property
    def report(self) -> str:
        return join(self.output, "_report.html")

    @property
    def report_pages(self) -> str:
        return join(self.output, "_report")

    @property
    def progress(self) -> str:
        return join(self.output, "_progress.json")

    @property
    def forced(self) -> str:
        return join(self.output, "_force.json")

    @property
    def config(self) -> str:
        return join(self.output, "_config.yaml")

    @property
    def cache(self) -> str:
        return self.cache_root or join(self.output, "_cache")

    @property
    def work_root(self) -> str:
        return join(self.output, "_work")

    def work(self, key: str) -> str:
        """The folder of one row's segments, `key` naming the row and how it is cut."""
        return join(self.work_root, key)

    def marker(self, row_id: str) -> str:
        return join(self.output, "_markers", f"{row_id}.json")

    def thumbnail(self, row_id: str) -> str:
        return join(self.output, "_thumbs", f"{row_id}.jpg")
